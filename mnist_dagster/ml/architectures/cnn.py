"""The default network: a small CNN with batch norm (conv-BN-ReLU-max-pool stages, then an MLP head)."""

from __future__ import annotations

from torch import Tensor, nn

from mnist_dagster.digits import IMAGE_SIDE, NUM_CLASSES


class DigitCNN(nn.Module):
    """One conv-BN-ReLU-max-pool stage per entry of `channels`, then a small MLP head."""

    #: The `TrainingConfig` fields this architecture reads (saved in its checkpoint).
    PARAMS = ("channels", "hidden", "dropout")

    def __init__(self, channels: tuple[int, ...], hidden: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, size = 1, IMAGE_SIDE
        for out_channels in channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            in_channels, size = out_channels, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * size * size, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
