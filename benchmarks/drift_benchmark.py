"""Drift benchmark (issue 22's acceptance): does `prediction_drift` stay quiet on clean traffic and alarm on
harm, per input path, on real MNIST?

    python benchmarks/drift_benchmark.py [--mnist DIR] [--epochs 2] [--windows 20] [--model /tmp/m.onnx]

Trains cnn-fast (`TrainingConfig` defaults, `--epochs`) through `ml.train.fit` on real MNIST and exports the
ONNX graph the endpoint serves (or reuses `--model` if that file exists). The ml branch's calibration is not on
main yet, so a temperature is fitted here on the validation split (NLL, bounded scalar search on the served
log-probabilities) and applied to every probability, as the endpoint will once it is in the graph.

The reference is built exactly as `model_evaluation` builds it (`lifecycle.reference.build_serving_reference`:
every fifth test image as pixels, every tenth as PNG uploads). Judged windows are 1,000 digits drawn from
the other 8,000 test images only (`judged_indices`: never in the reference; windows may share digits with each
other, rendered afresh each time), on each input path:
- json: the 28x28 pixels; upload: PNG uploads 28-400 px, either polarity, through `prepare_upload`;
- batch: the inbox's .npz pixels, whose table keeps digit and confidence only (no image statistics).
Clean: `--windows` windows per path. Shifted (one window each, per path): rotated 25 degrees, blurred
(sigma 1.2), noisy (sigma 0.3), thick strokes (3x3 dilation), class mix skewed to two digits (0 and 1), and
preprocessing broken after deployment (no centring, on the upload path only: JSON pixels and .npz arrays
pass through the recipe untouched). Prints false alarms and info findings per path, and per case whether it
was detected (alarm where the realised accuracy fell >= 1 point, else an info finding naming what changed),
with estimated vs realised accuracy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.lifecycle.reference import build_serving_reference, judged_indices
from mnist_dagster.ml import drift
from mnist_dagster.ml.cbpe import at_temperature, fit_temperature, realised_accuracy
from mnist_dagster.scoring import preprocess
from mnist_dagster.scoring.bundle import Predictor, make_bundle
from mnist_dagster.scoring.uploads import as_uploads, through_upload_recipe, typical_styles

WINDOW = 1000
PATHS = ("json", "upload", "batch")


class Calibrated:
    """The served graph's probabilities at temperature `t`: softmax(log p / t) = softmax(logits / t)."""

    def __init__(self, predictor: Predictor, temperature: float) -> None:
        self.predictor, self.temperature = predictor, temperature

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        return at_temperature(self.predictor.predict_proba(pixels), self.temperature)


def load_mnist(mnist_dir: Path) -> dict:
    from mnist_dagster.ml import data

    with tempfile.TemporaryDirectory() as folder:  # read_mnist unpacks beside the files
        for name in data.MNIST_FILES:
            shutil.copy(mnist_dir / name, folder)
        return {k: v.numpy() for k, v in data.read_mnist(Path(folder)).items()}


def trained_model(raw: dict, epochs: int, cache: Path) -> tuple[Predictor, np.ndarray, np.ndarray]:
    """The served graph (trained, or read from `cache`) and the validation split (uint8 images, labels)."""
    import torch

    from mnist_dagster.ml import data, model, train
    from mnist_dagster.ml.config import TrainingConfig

    tensors = {k: torch.from_numpy(v.astype(np.int64) if "labels" in k else v) for k, v in raw.items()}
    _, val_idx = data.stratified_split(tensors["train_labels"], 0.1, 0)
    val_images, val_labels = raw["train_images"][val_idx.numpy()], raw["train_labels"][val_idx.numpy()]
    if not cache.exists():
        split = data.normalise_and_split(tensors, val_fraction=0.1, seed=0)
        trained = train.fit(split, TrainingConfig(epochs=epochs), "cpu")
        cache.write_bytes(model.export_onnx(trained.checkpoint))
    return Predictor(make_bundle("bench", cache.read_bytes())), val_images, val_labels.astype(np.int64)


def as_json(digits: np.ndarray) -> np.ndarray:
    return digits.astype(np.float32) / 255


def as_upload(digits: np.ndarray, seed: int) -> np.ndarray:
    return through_upload_recipe(as_uploads(digits, typical_styles(len(digits), seed)))


def unit_to_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rotated 25°": lambda x: drift.rotate(x, 25),
    "blurred σ=1.2": lambda x: drift.blur(x, 1.2),
    "noisy σ=0.3": lambda x: drift.add_noise(x, 0.3, seed=3),
    "thick strokes 3x3": lambda x: drift.thicken(x, 3),
}


def judge(model, reference: drift.DriftReference, path: str, digits: np.ndarray, labels: np.ndarray, seed: int):
    """One window of uint8 digits through `path` -> (report, realised accuracy)."""
    images = as_upload(digits, seed) if path == "upload" else as_json(digits)
    probabilities = model.predict_proba(images.reshape(-1, 1, 28, 28))
    answers, confidences = probabilities.argmax(axis=1), probabilities.max(axis=1)
    report = drift.compare(
        reference.for_input(path), answers, confidences, None if path == "batch" else images
    )
    return report, realised_accuracy(int((answers == labels).sum()), len(labels))


def verdict(report: drift.DriftReport) -> str:
    if report.drift_detected:
        return f"ALARM {report.severity}"
    moved = [s.name for s in report.moved()]
    return f"info: {', '.join(moved)}" if moved else "quiet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mnist", type=Path, default=Path("/work/shared/data/mnist"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "drift-benchmark-cnn-fast.onnx")
    args = parser.parse_args()

    raw = load_mnist(args.mnist)
    served, val_images, val_labels = trained_model(raw, args.epochs, args.model)
    temperature = fit_temperature(served.predict_proba(as_json(val_images).reshape(-1, 1, 28, 28)), val_labels)
    model = Calibrated(served, temperature)
    test, test_labels = raw["test_images"], raw["test_labels"].astype(np.int64)
    reference = build_serving_reference(model, test)
    pool = judged_indices(len(test))  # judged windows never touch the reference's images
    print(f"temperature {temperature:.3f} (fitted on {len(val_labels)} validation images)")
    for kind, path_reference in reference.paths.items():
        print(f"reference {kind}: {path_reference.source}; estimated accuracy {path_reference.expected_accuracy:.2%}")
    baseline = {}
    print("\n## Clean windows (1,000 test digits each, disjoint from the reference)\n")
    print("| path | windows | alarms | info findings | what the info named | estimated (mean) | realised (mean) |")
    print("|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for path in PATHS:
        alarms, infos, named, estimated, realised = 0, 0, [], [], []
        for index in range(args.windows):
            chosen = rng.choice(pool, WINDOW, replace=False)
            report, truth = judge(model, reference, path, test[chosen], test_labels[chosen], 1000 + index)
            alarms += report.drift_detected
            infos += report.severity == "info"
            named += [s.name for s in report.moved() if report.severity == "info"]
            estimated.append(report.estimate.accuracy)
            realised.append(truth.accuracy)
        baseline[path] = float(np.mean(realised))
        print(f"| {path} | {args.windows} | {alarms} ({alarms / args.windows:.0%}) | {infos} ({infos / args.windows:.0%}) "
              f"| {', '.join(sorted(set(named))) or '-'} | {np.mean(estimated):.2%} | {np.mean(realised):.2%} |")
    print("\n## Shifted windows (one window of 1,000 per case and path)\n")
    print("| case | path | verdict | estimated | realised | realised drop | detected as required |")
    print("|---|---|---|---|---|---|---|")
    cases = [(name, shift, path) for name, shift in SHIFTS.items() for path in PATHS]
    cases += [("class mix: digits 0 and 1 only", None, path) for path in PATHS]
    cases += [("preprocessing broken after deployment (no centring)", "broken", "upload")]
    hits = 0
    for number, (name, shift, path) in enumerate(cases):
        candidates = pool[np.isin(test_labels[pool], [0, 1])] if shift is None else pool
        chosen = np.random.default_rng(100 + number).choice(candidates, WINDOW, replace=False)
        digits = test[chosen] if shift in (None, "broken") else unit_to_uint8(shift(as_json(test[chosen])))
        if shift == "broken":
            original = preprocess._centre_by_mass
            preprocess._centre_by_mass = _top_left
            try:
                report, truth = judge(model, reference, path, digits, test_labels[chosen], 5000 + number)
            finally:
                preprocess._centre_by_mass = original
        else:
            report, truth = judge(model, reference, path, digits, test_labels[chosen], 5000 + number)
        drop = baseline[path] - truth.accuracy
        ok = report.drift_detected if drop >= 0.01 else report.severity != "none"
        hits += ok
        print(f"| {name} | {path} | {verdict(report)} | {report.estimate.text()} | {truth.text()} | "
              f"{drop * 100:+.2f} pts | {'yes' if ok else 'NO'} |")
    print(f"\ndetected as required: {hits} of {len(cases)} shifted windows ({hits / len(cases):.0%})")


def _top_left(box: np.ndarray) -> np.ndarray:
    """A recipe that lost its centring: the scaled digit pasted at the field's top-left corner."""
    field = np.zeros((28, 28), np.float32)
    field[: box.shape[0], : box.shape[1]] = box
    return field


if __name__ == "__main__":
    main()
