"""What a trained model is: a checkpoint that names its architecture, and the ONNX graph it serves as.

A checkpoint is a plain dict of the architecture's name and parameters, the input normalisation and
the weights, so it loads with `torch.load(weights_only=True)`: nothing is unpickled but tensors and
primitives. The networks themselves are in `mnist_dagster.ml.architectures`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mnist_dagster.digits import IMAGE_SIDE
from mnist_dagster.ml.architectures import build
from mnist_dagster.ml.calibrate import TemperatureScaled
from mnist_dagster.ml.data import tensors_from_bytes, tensors_to_bytes

CHECKPOINT_FORMAT = "mnist-dagster/checkpoint-v2"
CNN_V1_FORMAT = "mnist-dagster/cnn-v1"  # before the model zoo: always a CNN, still loadable


class ServingModel(nn.Module):
    """Raw pixels in [0, 1] -> class probabilities: the normalisation is part of the deployed graph, and so is
    the temperature when `model` is the `TemperatureScaled` network `load_checkpoint` returns."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model((pixels - self.mean) / self.std), dim=1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_checkpoint(
    model: nn.Module, architecture: str, params: Mapping[str, Any], mean: float, std: float, temperature: float = 1.0
) -> dict[str, Any]:
    """The checkpoint of `model`, built as `architectures.build(architecture, params)`, with the temperature
    that calibrates its probabilities (`ml.calibrate`)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "architecture": architecture,
        "config": {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()},
        "normalisation": {"mean": mean, "std": std},
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "temperature": float(temperature),
    }


def load_checkpoint(
    checkpoint: Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[TemperatureScaled, dict]:
    """The model in eval mode and its normalisation; refuses anything that is not our format.

    The network comes wrapped in its temperature (1.0 for checkpoints from before calibration), so whoever
    takes a softmax of its output (evaluation, the ONNX export) gets calibrated probabilities.
    """
    fmt = checkpoint.get("format")
    if fmt not in (CHECKPOINT_FORMAT, CNN_V1_FORMAT):
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint (format={fmt!r})")
    architecture = checkpoint.get("architecture", "cnn") if fmt == CHECKPOINT_FORMAT else "cnn"
    model = build(architecture, checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    scaled = TemperatureScaled(model, checkpoint.get("temperature", 1.0))
    return scaled.to(device).eval(), checkpoint["normalisation"]


def checkpoint_to_bytes(checkpoint: Mapping[str, Any]) -> bytes:
    return tensors_to_bytes(checkpoint)


def checkpoint_from_bytes(data: bytes) -> dict:
    return tensors_from_bytes(data)


def export_onnx(checkpoint: Mapping[str, Any]) -> bytes:
    """The serving graph (normalise, network, divide by the temperature, softmax) as ONNX with a dynamic batch axis."""
    model, norm = load_checkpoint(checkpoint)
    serving = ServingModel(model, norm["mean"], norm["std"]).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        serving,
        (torch.zeros(1, 1, IMAGE_SIDE, IMAGE_SIDE),),
        buffer,
        input_names=["pixels"],
        output_names=["probabilities"],
        dynamic_axes={"pixels": {0: "batch"}, "probabilities": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return buffer.getvalue()
