"""Calibrated probabilities: one temperature per model, fitted on the validation split.

Trained with label smoothing, the networks are under-confident: they say 91-95% on digits they read
right, so every statistic built on confidence (drift, label-free accuracy, the page) inherits the bias.
Temperature scaling (Guo et al. 2017) divides the logits by one number T > 0 fitted to minimise the
negative log-likelihood of held-out labels. It never changes a prediction (the arg-max of logits / T is
the arg-max of the logits), only how sure the probabilities say the model is.

`fit` (ml.train) fits T after training and stores it in the checkpoint (`"temperature"`);
`ml.model.load_checkpoint` wraps the network in `TemperatureScaled`, so the ONNX graph (endpoint, batch
scoring, page) and the PyTorch evaluation all compute softmax(logits / T) with no other change.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Equal-width confidence bins of the expected calibration error (as the issue and torchmetrics count them).
ECE_BINS = 15


class TemperatureScaled(nn.Module):
    """`network`'s logits divided by `temperature`: softmax of its output is the calibrated probabilities.

    The temperature is a plain float, not a parameter or buffer, so the state dict stays the network's own
    (checkpoints keep their keys) and the ONNX export traces it as a constant.
    """

    def __init__(self, network: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.network, self.temperature = network, float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x) / self.temperature


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Calibrated class probabilities: softmax(logits / temperature) over the last axis."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100) -> float:
    """The T > 0 that minimises the mean NLL of `labels` under softmax(`logits` / T).

    Optimised over log T (so T stays positive and the problem is smooth) with L-BFGS and a strong-Wolfe
    line search, in float64 on the CPU from T = 1: the same logits always give the same T. The NLL is
    convex in 1/T, so the minimum found is the minimum. No labels: 1.0 (nothing to fit on).
    """
    if len(labels) == 0:
        return 1.0
    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-10, tolerance_change=1e-12)  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().item())


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width confidence bins: sum over bins of |bin| / N * |accuracy - mean confidence|.

    Confidence is the top probability; bin b holds confidences in [b / bins, (b + 1) / bins), the last bin
    also 1.0 (torchmetrics' `MulticlassCalibrationError(norm="l1")` bins the same way). 0 is perfect.
    """
    if len(labels) == 0:
        return float("nan")
    confidences, predictions = probabilities.double().max(dim=1)
    correct = (predictions == labels).double()
    which = (confidences * bins).floor().long().clamp_(0, bins - 1)
    confidence_sums = torch.bincount(which, weights=confidences, minlength=bins)
    correct_sums = torch.bincount(which, weights=correct, minlength=bins)
    return float((confidence_sums - correct_sums).abs().sum().item() / len(labels))


def reliability_table(probabilities: Tensor, labels: Tensor, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: its range, image count, mean confidence and accuracy (the reliability diagram's data)."""
    confidences, predictions = probabilities.double().max(dim=1)
    correct = (predictions == labels).double()
    which = (confidences * bins).floor().long().clamp_(0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"low": b / bins, "high": (b + 1) / bins, "count": int(inside.sum()),
                         "confidence": float(confidences[inside].mean()), "accuracy": float(correct[inside].mean())})  # fmt: skip
    return rows
