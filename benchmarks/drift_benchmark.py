"""Drift benchmark: what `prediction_drift`'s statistics measure on real MNIST traffic, clean and shifted,
and so where its thresholds belong.

    python benchmarks/drift_benchmark.py [--mnist DIR] [--epochs 3] [--train-subset N] [--json OUT]

Trains the production model (`cnn-fast`, the `TrainingConfig` defaults) through `ml.train.fit`, takes the
drift reference exactly as the pipeline does (`ml.drift.build_reference`: training images and labels, the
model's test-set confidences), then feeds windows of 1,000 images as traffic, each through the serving
preprocessing (`serving.preprocess.mnist_format_many`: what the endpoint and the batch log) and the model:
- the 10k test set in ten chunks of 1,000 (the null the thresholds must stay quiet on), and the 5,000
  validation images, never trained on and not in the reference, in five chunks;
- 1,000 test digits shifted: rotated 15-90 degrees, Gaussian noise, strokes thickened or eroded, and
  inverted (black on white, which preprocessing turns back: not drift).
Prints a Markdown table of every statistic per window, with the severity each gets under the default
`DriftThresholds`, and how long `compare` takes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.ml import data, drift, train
from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.scoring.preprocess import mnist_format_many

CHUNK = 1000
SHIFTED_SEED = 7

Shift = Callable[[np.ndarray], np.ndarray]  # float (N, 28, 28) in [0, 1] -> the same, shifted
SHIFTS: dict[str, Shift] = {
    "rotated 15°": lambda x: drift.rotate(x, 15),
    "rotated 30°": lambda x: drift.rotate(x, 30),
    "rotated 45°": lambda x: drift.rotate(x, 45),
    "rotated 60°": lambda x: drift.rotate(x, 60),
    "rotated 90°": lambda x: drift.rotate(x, 90),
    "noise σ=0.1": lambda x: drift.add_noise(x, 0.1),
    "noise σ=0.3 (heavy)": lambda x: drift.add_noise(x, 0.3),
    "noise σ=0.5 (heavy)": lambda x: drift.add_noise(x, 0.5),
    "thickened 2x2": lambda x: drift.thicken(x, 2),
    "thickened 3x3": lambda x: drift.thicken(x, 3),
    "eroded 2x2": lambda x: drift.erode(x, 2),
    "off centre by 2 px": lambda x: drift.shift(x, 2),
    "off centre by 3 px": lambda x: drift.shift(x, 3),
    "inverted (black on white)": lambda x: 1.0 - x,
}
COLUMNS = ["predicted_class", "confidence", "low_confidence_rate", *drift.FEATURES]


def load_mnist(mnist_dir: Path) -> dict[str, torch.Tensor]:
    """The four files read into tensors; copied to a temp folder first, since `read_mnist` unpacks beside them."""
    with tempfile.TemporaryDirectory() as folder:
        for name in data.MNIST_FILES:
            shutil.copy(mnist_dir / name, folder)
        return data.read_mnist(Path(folder))


def serve(model: torch.nn.Module, split: data.NormalisedSplit, unit: np.ndarray) -> tuple[np.ndarray, ...]:
    """What the endpoint does with `unit` (float (N, 28, 28) in [0, 1]): uint8, MNIST preprocessing, the
    model. Returns (preprocessed images (K, 28, 28), digits, confidences) of the K it accepts."""
    grey = np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)
    pixels, rejected = mnist_format_many(grey)
    keep = np.setdiff1d(np.arange(len(grey)), list(rejected))
    pixels = pixels[keep]
    inputs = (torch.from_numpy(pixels) - split.mean) / split.std
    probabilities = torch.softmax(train.predict_logits(model, inputs), dim=1).numpy()
    return pixels[:, 0], probabilities.argmax(1), probabilities.max(1)


def row(name: str, report: drift.DriftReport) -> dict:
    values = {s.name: (s.value, s.severity) for s in report.statistics}
    return {"window": name, "traffic": report.traffic, "severity": report.severity, "values": values}


def markdown(rows: list[dict]) -> str:
    marks = {"none": "", "moderate": " ▲", "severe": " ▲▲"}
    lines = ["| window | " + " | ".join(COLUMNS) + " | verdict |", "|---" * (len(COLUMNS) + 2) + "|"]
    for entry in rows:
        cells = [f"{entry['values'][c][0]:.3f}{marks[entry['values'][c][1]]}" for c in COLUMNS]
        lines.append(f"| {entry['window']} | " + " | ".join(cells) + f" | {entry['severity']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--epochs", type=int, default=TrainingConfig().epochs)
    parser.add_argument("--train-subset", type=int, help="train on this many images only (a quick smoke run)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    raw = load_mnist(args.mnist)
    split = data.normalise_and_split(raw, 1 / 12, 0)
    started = time.perf_counter()
    fitting = split
    if args.train_subset:
        fitting = data.NormalisedSplit.from_dict({**split.as_dict(), "train_images": split.train_images[: args.train_subset],
                                                  "train_labels": split.train_labels[: args.train_subset]})  # fmt: skip
    trained = train.fit(fitting, TrainingConfig(epochs=args.epochs), "cpu")
    print(f"trained cnn-fast, {args.epochs} epoch(s), in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    model = trained.model.cpu()

    unit = lambda x: x.numpy().reshape(-1, 28, 28) * split.std + split.mean
    test_unit, val_unit = unit(split.test_images), unit(split.val_images)
    test_pixels, test_digits, test_confidences = serve(model, split, test_unit)
    accuracy = float(np.mean(test_digits == split.test_labels.numpy()))
    reference = drift.build_reference(unit(split.train_images), split.train_labels.numpy(), test_confidences)
    print(f"test accuracy {accuracy:.4f}; reference {len(reference.to_json()) / 1024:.0f} KB", file=sys.stderr)

    rows = []
    for i in range(0, len(test_digits), CHUNK):
        window = slice(i, i + CHUNK)
        report = drift.compare(reference, test_digits[window], test_confidences[window], test_pixels[window])
        rows.append(row(f"test {i}-{i + CHUNK - 1}", report))
    for i in range(0, len(val_unit) - CHUNK + 1, CHUNK):
        rows.append(
            row(
                f"validation {i}-{i + CHUNK - 1}",
                drift.compare(reference, *_reorder(serve(model, split, val_unit[i : i + CHUNK]))),
            )
        )
    chosen = np.random.default_rng(SHIFTED_SEED).choice(len(test_unit), CHUNK, replace=False)
    for name, shift in SHIFTS.items():
        pixels, digits, confidences = serve(model, split, shift(test_unit[chosen]).astype(np.float32))
        report = drift.compare(reference, digits, confidences, pixels)
        entry = row(name, report)
        entry["accuracy"] = float(np.mean(digits == split.test_labels.numpy()[chosen][: len(digits)]))
        rows.append(entry)

    timing = {}
    for size in (1_000, 100_000):
        picks = np.random.default_rng(0).integers(0, len(test_digits), size)
        started = time.perf_counter()
        drift.compare(reference, test_digits[picks], test_confidences[picks], test_pixels[picks])
        timing[size] = time.perf_counter() - started

    print(f"cnn-fast, {args.epochs} epoch(s): test accuracy {accuracy:.4f}; "
          f"reference {len(reference.to_json()) / 1024:.0f} KB; defaults {drift.DriftThresholds()}\n")  # fmt: skip
    print(markdown(rows))
    clean = [r for r in rows if r["window"].startswith(("test", "validation"))]
    alarms = sum(r["severity"] != "none" for r in clean)
    print(f"\nclean windows alarming: {alarms} of {len(clean)}")
    print(
        "accuracy on the shifted windows: "
        + ", ".join(f"{r['window']} {r['accuracy']:.3f}" for r in rows if "accuracy" in r)
    )
    print("compare() time: " + ", ".join(f"{n:,} predictions {s * 1000:.0f} ms" for n, s in timing.items()))
    if args.json:
        args.json.write_text(json.dumps({"accuracy": accuracy, "rows": rows, "timing": timing}, indent=1, default=str))


def _reorder(served: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """(pixels, digits, confidences) -> compare's (digits, confidences, images)."""
    pixels, digits, confidences = served
    return digits, confidences, pixels


if __name__ == "__main__":
    main()
