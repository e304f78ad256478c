"""An ensemble served as one network: members of one architecture, each divided by its own temperature,
whose calibrated probabilities are averaged.

Its output is the log of the averaged probabilities, so softmax of it (what `ml.model.ServingModel`, the
evaluation and the ONNX graph take) is exactly that average: the ensemble is checkpointed, exported,
gated and served as any single network is. The members' temperatures are a buffer, saved with the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

#: The name a checkpoint gives an ensemble's architecture.
ENSEMBLE = "ensemble"


class DigitEnsemble(nn.Module):
    """`members` (networks of one architecture); the forward pass is log(mean_i softmax(member_i(x) / T_i))."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperatures", torch.ones(len(members)))

    def forward(self, x: Tensor) -> Tensor:
        probabilities = torch.stack(
            [torch.softmax(member(x) / self.temperatures[index], dim=1) for index, member in enumerate(self.members)]
        )
        return torch.log(probabilities.mean(dim=0).clamp_min(1e-30))


def ensemble_params(architecture: str, params: Mapping[str, Any], members: int) -> dict[str, Any]:
    """What a checkpoint records to rebuild the ensemble (`architectures.build(ENSEMBLE, ...)`)."""
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()}
    return {"architecture": architecture, "params": plain, "members": members}


def assemble(networks: list[nn.Module], temperatures: list[float]) -> DigitEnsemble:
    """Trained networks and their fitted temperatures, as one ensemble (in eval mode, on the CPU)."""
    ensemble = DigitEnsemble([network.cpu() for network in networks])
    ensemble.temperatures.copy_(torch.tensor(temperatures, dtype=torch.float32))
    return ensemble.eval()
