"""The digit classifier: a small CNN with batch norm, and its checkpoint format.

A checkpoint is a plain dict of the architecture config, the input normalisation and the weights,
so it loads with `torch.load(weights_only=True)`: nothing is unpickled but tensors and primitives.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mnist_dagster.ml.config import TrainingConfig

CHECKPOINT_FORMAT = "mnist-dagster/cnn-v1"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: one conv-BN-ReLU-max-pool stage per entry of `channels`, then a small MLP head.

    No defaults here: they are `TrainingConfig`'s (`mnist_dagster.ml.config`), the one block of them.
    """

    channels: tuple[int, ...]
    hidden: int
    dropout: float

    @classmethod
    def from_training(cls, config: TrainingConfig) -> ModelConfig:
        return cls(channels=tuple(config.channels), hidden=config.hidden, dropout=config.dropout)


class DigitCNN(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels, size = 1, 28
        for out_channels in config.channels:
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
            nn.Linear(in_channels * size * size, config.hidden, bias=False),
            nn.BatchNorm1d(config.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ServingModel(nn.Module):
    """Raw pixels in [0, 1] -> class probabilities: the normalisation is part of the deployed graph."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((pixels - self.mean) / self.std), dim=1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_checkpoint(model: nn.Module, config: ModelConfig, mean: float, std: float) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(config).items()},
        "normalisation": {"mean": mean, "std": std},
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }


def load_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> tuple[DigitCNN, dict]:
    """The model in eval mode and its normalisation; refuses anything that is not our format."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (format={checkpoint.get('format')!r})")
    config = ModelConfig(**{**checkpoint["config"], "channels": tuple(checkpoint["config"]["channels"])})
    model = DigitCNN(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint["normalisation"]


def checkpoint_to_bytes(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def checkpoint_from_bytes(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def export_onnx(checkpoint: dict) -> bytes:
    """The serving graph (normalise, CNN, softmax) as ONNX with a dynamic batch axis."""
    model, norm = load_checkpoint(checkpoint)
    serving = ServingModel(model, norm["mean"], norm["std"]).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        serving,
        (torch.zeros(1, 1, 28, 28),),
        buffer,
        input_names=["pixels"],
        output_names=["probabilities"],
        dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return buffer.getvalue()
