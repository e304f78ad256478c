"""The networks a digit classifier can be, by name: `TrainingConfig.architecture` picks one.

Each class names the `TrainingConfig` fields it reads in `PARAMS`; its constructor takes exactly those.
A checkpoint records the name and those values, so it rebuilds the same network (`ml.model`).
To add one: a module here with an `nn.Module` that maps (N, 1, 28, 28) to (N, 10) logits and exports
to ONNX, and a line in `ARCHITECTURES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from mnist_dagster.ml.architectures.cnn import DigitCNN
from mnist_dagster.ml.architectures.ensemble import ENSEMBLE, DigitEnsemble
from mnist_dagster.ml.architectures.resnet import DigitResNet
from mnist_dagster.ml.architectures.vit import DigitViT

ARCHITECTURES: dict[str, type[nn.Module]] = {"cnn": DigitCNN, "resnet": DigitResNet, "vit": DigitViT}


def build(architecture: str, params: Mapping[str, Any]) -> nn.Module:
    """The network `architecture` with `params` (lists from JSON or checkpoints become tuples).

    `ensemble` is the one composite: its params are the members' architecture, their params and their number
    (`TrainingConfig.members` > 1 trains one; see `architectures.ensemble`).
    """
    if architecture == ENSEMBLE:
        return DigitEnsemble([build(params["architecture"], params["params"]) for _ in range(params["members"])])
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def params_of(architecture: str, config: Any) -> dict[str, Any]:
    """The values of the fields `architecture` reads, taken from `config` (a `TrainingConfig`)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    return {name: getattr(config, name) for name in ARCHITECTURES[architecture].PARAMS}
