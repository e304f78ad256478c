"""Test-set evaluation: accuracy, confusion matrix, per-class scores, and the metrics beyond accuracy.

`evaluate` gives what the gate needs (accuracy, the confusion matrix, per-class precision, recall and
F1). The metrics beyond accuracy (calibration, robustness, the top confused pairs) are plain functions
registered with `@metric`: each takes the `Scored` test set and returns a `MetricResult`, which
`model_evaluation` shows in the UI and logs to MLflow. To add one, write one function here:

    @metric()
    def mean_confidence(scored: Scored) -> MetricResult:
        # the average top probability: a quick read of over- or under-confidence
        return MetricResult({"mean_confidence": scored.probabilities.max(1).values.mean().item()})

It then runs in every evaluation (`@metric(default=False)`: only when the config names it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from statsmodels.stats.proportion import proportion_confint
from torch import nn

from mnist_dagster.ml import plots
from mnist_dagster.ml.data import NUM_CLASSES
from mnist_dagster.ml.robustness import (  # noqa: F401 - perturbations: part of this module's API
    ROBUSTNESS_DEGREES,
    ROBUSTNESS_NOISE_SIGMA,
    ROBUSTNESS_SHIFT_PX,
    all_perturbations,
    perturbations,
    robustness_indices,
)
from mnist_dagster.ml.train import predict_logits

#: Images per forward pass when scoring: large batches amortise the per-call overhead on CPU.
SCORING_BATCH = 8192


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    confusion: torch.Tensor  # (10, 10) int64: rows are true digits, columns predictions
    precision: list[float]
    recall: list[float]
    f1: list[float]
    predictions: torch.Tensor
    confidences: torch.Tensor
    probabilities: torch.Tensor  # (N, 10) softmax

    def misclassified(self, labels: torch.Tensor) -> torch.Tensor:
        """Indices of wrong predictions, most confident mistakes first."""
        wrong = torch.nonzero(self.predictions != labels).flatten()
        return wrong[self.confidences[wrong].argsort(descending=True)]


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    flat = labels * NUM_CLASSES + predictions
    return torch.bincount(flat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class_scores(confusion: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    correct = confusion.diag().double()
    precision = correct / confusion.sum(0).clamp(min=1)
    recall = correct / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return precision.tolist(), recall.tolist(), f1.tolist()


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu") -> Evaluation:
    with torch.inference_mode():
        probabilities = predict_logits(model, images, device, batch_size=SCORING_BATCH).softmax(1)
    return evaluation_of(probabilities, labels)


def evaluation_of(probabilities: torch.Tensor, labels: torch.Tensor) -> Evaluation:
    """Accuracy, confusion and per-class scores of answers already computed (the one batched pass)."""
    confidences, predictions = probabilities.max(1)
    confusion = confusion_matrix(labels, predictions)
    precision, recall, f1 = per_class_scores(confusion)
    return Evaluation(
        accuracy=(predictions == labels).double().mean().item(),
        confusion=confusion,
        precision=precision,
        recall=recall,
        f1=f1,
        predictions=predictions,
        confidences=confidences,
        probabilities=probabilities,
    )


# --- metrics beyond accuracy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """What every metric sees: the model, the test set as it takes it, and its answers on it.

    `score_in_one_pass` fills `logits` and `perturbed_predictions` from one batched pass over the test
    set and all of its perturbations, so no metric runs the model again; built by hand (tests), a
    metric that needs the perturbations scores them itself.
    """

    model: nn.Module
    images: torch.Tensor  # (N, 1, 28, 28) standardised: (pixels - mean) / std
    labels: torch.Tensor
    probabilities: torch.Tensor  # (N, 10) softmax(logits / temperature): what the deployed model says
    mean: float
    std: float
    device: str = "cpu"
    seed: int = 0  # every random perturbation is drawn from it: same seed, same table
    temperature: float = 1.0  # the checkpoint's calibration (1.0: none)
    logits: torch.Tensor | None = None  # (N, 10) before the temperature, when known
    #: condition -> predicted digits on the `robustness_indices` images
    perturbed_predictions: Mapping[str, torch.Tensor] | None = None

    def pixels(self) -> torch.Tensor:
        """The test images as pixels in [0, 1] (white ink on black), where perturbations are defined."""
        return (self.images * self.std + self.mean).clamp(0, 1)

    def accuracy_on(self, pixels: torch.Tensor) -> float:
        """The model's accuracy on these labels for other pixels (e.g. perturbed test images)."""
        predictions = _predict(self.model, [(pixels - self.mean) / self.std], self.device)[0]
        return (predictions == self.labels).double().mean().item()

    def uncalibrated_probabilities(self) -> torch.Tensor:
        """softmax(logits), the answers before temperature scaling: from the logits when kept, else
        recovered from the calibrated probabilities (softmax(T log p) = softmax(logits), exactly)."""
        if self.temperature == 1.0:
            return self.probabilities
        if self.logits is not None:
            return self.logits.softmax(1)
        return (self.probabilities.double().clamp(min=1e-300).log() * self.temperature).softmax(1).float()

    def robustness_indices(self) -> torch.Tensor:
        """The test images the perturbations are applied to (`ml.robustness.robustness_indices`)."""
        return robustness_indices(len(self.labels))

    def predictions_under_perturbations(self) -> Mapping[str, torch.Tensor]:
        """Predicted digits on each perturbed copy of the `robustness_indices` test images (from the one
        pass when it ran)."""
        if self.perturbed_predictions is not None:
            return self.perturbed_predictions
        perturbed = all_perturbations(self.pixels()[self.robustness_indices()], self.seed)
        inputs = [(pixels - self.mean) / self.std for pixels in perturbed.values()]
        return dict(zip(perturbed, _predict(self.model, inputs, self.device), strict=True))


#: A served model: float32 pixels (N, 1, 28, 28) in [0, 1] -> its probabilities (N, 10), e.g. an ONNX
#: Runtime session over the exported graph (normalisation, network, softmax(logits / temperature)).
Served = Callable[[np.ndarray], np.ndarray]


def score_in_one_pass(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
    device: str = "cpu", seed: int = 0, temperature: float = 1.0, served: Served | None = None,
) -> tuple[Evaluation, Scored]:  # fmt: skip
    """The test set, and every perturbation of its `robustness_indices` images, scored in one batched
    pass; every metric then reads from its answers.

    With `served` (the exported graph in ONNX Runtime: about 3x PyTorch's speed on 2 CPU cores for the
    default CNN, and the model exactly as it will serve), the pass runs there, in calls of the size the
    CPU's caches like (`scoring.bundle.PREDICT_CHUNK`); its probabilities already carry the temperature.
    Without it, `model` runs in inference mode, `SCORING_BATCH` images a call, and the temperature is
    applied to its logits.
    """
    pixels = (images * std + mean).clamp(0, 1)
    perturbed = all_perturbations(pixels[robustness_indices(len(labels))], seed)
    sizes = [len(labels), *(len(p) for p in perturbed.values())]
    if served is not None:
        clean, *others = torch.from_numpy(served(torch.cat([pixels, *perturbed.values()]).numpy())).split(sizes)
        probabilities, logits = clean, None
    else:
        with torch.inference_mode():
            inputs = torch.cat([images, *((p - mean) / std for p in perturbed.values())])
            logits, *others = predict_logits(model, inputs, device, batch_size=SCORING_BATCH).split(sizes)
        probabilities = (logits / temperature).softmax(1)
    predictions = {name: part.argmax(1) for name, part in zip(perturbed, others, strict=True)}
    scored = Scored(model, images, labels, probabilities, mean, std, device, seed, temperature, logits, predictions)
    return evaluation_of(probabilities, labels), scored


def _predict(model: nn.Module, inputs: Sequence[torch.Tensor], device: str) -> list[torch.Tensor]:
    """Predicted digits for each tensor of standardised images, all scored in one batched pass."""
    if not inputs:
        return []
    with torch.inference_mode():
        logits = predict_logits(model, torch.cat(list(inputs)), device, batch_size=SCORING_BATCH)
    return list(logits.argmax(1).split([len(x) for x in inputs]))


@dataclass(frozen=True)
class MetricResult:
    """Numbers (logged as MLflow metrics), an optional table and PNG, and a sentence saying what was tested."""

    scalars: dict[str, float]
    table: list[dict] = field(default_factory=list)
    png: bytes | None = None
    summary: str = ""
    columns: tuple[str, ...] = ()  # the table's columns when it may be empty (default: the first row's keys)


Metric = Callable[[Scored], MetricResult]
METRICS: dict[str, Metric] = {}
DEFAULT_METRICS: list[str] = []


def metric(default: bool = True) -> Callable[[Metric], Metric]:
    """Register a metric under its function's name; `default` ones run when the config names none."""

    def register(function: Metric) -> Metric:
        METRICS[function.__name__] = function
        if default:
            DEFAULT_METRICS.append(function.__name__)
        return function

    return register


def run_metrics(scored: Scored, names: Sequence[str] | None = None) -> dict[str, MetricResult]:
    """The named metrics (the defaults when `names` is None), in order; an unknown name is an error."""
    names = DEFAULT_METRICS if names is None else list(names)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; ml/evaluate.py defines {', '.join(METRICS)}")
    return {name: METRICS[name](scored) for name in names}


def calibration_bins(confidences: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> list[dict]:
    """Equal-width confidence bins over [0, 1]: each bin's image count, mean confidence and accuracy."""
    index = (confidences.double() * bins).floor().long().clamp(0, bins - 1)  # confidence 1.0 goes in the top bin
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append({
            "lower": round(b / bins, 4), "upper": round((b + 1) / bins, 4), "images": count,
            "confidence": confidences[members].double().mean().item() if count else math.nan,
            "accuracy": correct[members].double().mean().item() if count else math.nan,
        })  # fmt: skip
    return rows


def expected_calibration_error(bins: Sequence[dict]) -> float:
    """ECE (Guo et al. 2017): the images-weighted mean of |accuracy - confidence| over the bins."""
    total = sum(row["images"] for row in bins)
    if total == 0:
        return math.nan
    return sum(row["images"] / total * abs(row["accuracy"] - row["confidence"]) for row in bins if row["images"])


@metric()
def calibration(scored: Scored) -> MetricResult:
    """Does a 90%-confident answer come true 90% of the time? ECE over 15 equal-width bins, as served
    (after the checkpoint's temperature) and before it (temperature 1), and the reliability diagram."""
    confidences, predictions = scored.probabilities.max(1)
    correct = predictions == scored.labels  # a positive temperature never changes the argmax
    bins = calibration_bins(confidences, correct)
    ece = expected_calibration_error(bins)
    before = calibration_bins(scored.uncalibrated_probabilities().max(1).values, correct)
    ece_before = expected_calibration_error(before)
    calibrated = scored.temperature != 1.0
    table = [{**row, "confidence": round(row["confidence"], 4), "accuracy": round(row["accuracy"], 4)} for row in bins if row["images"]]
    return MetricResult(
        {"expected_calibration_error": ece, "expected_calibration_error_uncalibrated": ece_before,
         "calibration_temperature": scored.temperature},  # fmt: skip
        table=table,
        png=plots.reliability_diagram_png(bins, ece, before if calibrated else None, ece_before),
        summary=(
            "Expected calibration error: test images grouped in 15 equal-width bins of confidence (the top "
            "softmax probability); the count-weighted mean gap between each bin's accuracy and its mean "
            f"confidence. 0 is perfectly calibrated. As served, at temperature {scored.temperature:.4g}: "
            f"{100 * ece:.2f}%; before calibration (temperature 1): {100 * ece_before:.2f}%."
        ),
    )


@metric()
def robustness(scored: Scored) -> MetricResult:
    """Accuracy on test digits under what uploads and other hands do to a digit: noise, rotation, shift,
    stroke thickness, blur, low resolution, off-centre, elastic distortion (one pass: `score_in_one_pass`),
    each with its 95% Wilson interval, and its drop against the same digits unperturbed."""
    indices = scored.robustness_indices()
    correct = scored.probabilities.argmax(1) == scored.labels
    clean_on_subset = correct[indices].double().mean().item()
    labels = scored.labels[indices]
    rows = [_robustness_row("clean", int(correct.sum()), len(correct), 0.0)]
    for condition, predictions in scored.predictions_under_perturbations().items():
        right = int((predictions == labels).sum())
        rows.append(_robustness_row(condition, right, len(labels), clean_on_subset - right / len(labels)))
    worst = min(rows, key=lambda row: row["accuracy"])
    return MetricResult(
        {
            "robustness_worst_accuracy": worst["accuracy"],
            **{f"robust_accuracy_{r['condition']}": r["accuracy"] for r in rows[1:]},
        },
        table=rows,
        summary=(
            f"Test accuracy under Gaussian pixel noise (sigma {ROBUSTNESS_NOISE_SIGMA} on [0, 1]), rotation by "
            f"-{ROBUSTNESS_DEGREES:g} and +{ROBUSTNESS_DEGREES:g} degrees, a {ROBUSTNESS_SHIFT_PX}-pixel shift in a random "
            f"direction, and {', '.join(row['condition'] for row in rows[5:])}, each on the same {len(labels)} of the "
            f"{len(scored.labels)} test images{_every_kth(len(scored.labels), len(labels))}, drawn from seed "
            f"{scored.seed}. Each row: accuracy with its 95% Wilson score interval (binomial), and its drop "
            f"against those digits unperturbed ({100 * clean_on_subset:.2f}%); clean: all {len(correct)} images. Worst: "
            f"{worst['condition']} ({100 * worst['accuracy']:.2f}%)."
        ),
    )


def _every_kth(total: int, chosen: int) -> str:
    step = total // max(1, chosen)
    return f" (every {step}th)" if step > 1 else ""


def _robustness_row(condition: str, right: int, images: int, drop: float) -> dict:
    """One row of the robustness table: the accuracy of `right` of `images` and its 95% Wilson score interval
    (statsmodels: honest near 100%, where the normal approximation's interval would pass 1)."""
    low, high = proportion_confint(right, images, alpha=0.05, method="wilson")
    return {"condition": condition, "accuracy": round(right / images, 4), "interval_low": round(low, 4),
            "interval_high": round(high, 4), "images": images, "drop": round(drop, 4)}  # fmt: skip


@metric()
def confused_pairs(scored: Scored, top: int = 5) -> MetricResult:
    """Which true digit is most often taken for which: the largest off-diagonal cells of the confusion matrix."""
    confusion = confusion_matrix(scored.labels, scored.probabilities.argmax(1))
    errors = confusion.clone().fill_diagonal_(0)
    total = max(1, int(errors.sum()))
    counts, cells = errors.flatten().topk(top)
    rows = [
        {"true": int(cell) // NUM_CLASSES, "predicted": int(cell) % NUM_CLASSES, "count": int(count),
         "share_of_errors": round(int(count) / total, 4)}
        for count, cell in zip(counts, cells, strict=True) if int(count) > 0
    ]  # fmt: skip
    top_share = sum(row["share_of_errors"] for row in rows)
    return MetricResult(
        {"top_confused_pairs_share_of_errors": top_share},
        table=rows,
        columns=("true", "predicted", "count", "share_of_errors"),
        summary=f"The {len(rows)} most frequent (true -> predicted) mistakes on the test set: {100 * top_share:.0f}% of all {total} errors.",
    )
