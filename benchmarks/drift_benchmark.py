"""Drift benchmark (issue 22's acceptance): does `prediction_drift` stay quiet on clean traffic and alarm on
harm, per input path, on real MNIST?

    python benchmarks/drift_benchmark.py [--epochs N] [--windows 20] [--model /tmp/m.onnx]

The model is the pipeline's, served as the endpoint serves it: cnn-fast (`TrainingConfig` defaults, or `--epochs`)
trained by `ml.train.fit` on the split `processed_mnist_data` makes by default (55k/5k stratified, seed 0, MNIST
fetched and md5-checked from `MNIST_MIRRORS` by `ml.data.fetch_mnist`), its temperature fitted on the validation
split by `fit` itself (`ml.calibrate`), exported by `ml.model.export_onnx` as the graph the endpoint serves
(calibration inside) and read through `scoring.bundle.Predictor`. `--model` caches that graph: an existing file
is reused, so reruns skip the training.

The reference is built exactly as `model_evaluation` builds it (`lifecycle.reference.build_serving_reference`:
every fifth test image as pixels, every tenth as PNG uploads). Judged windows are 1,000 digits drawn from
the other 8,000 test images only (`judged_indices`: never in the reference; windows may share digits with each
other, rendered afresh each time), on each input path:
- json: the 28x28 pixels; upload: PNG uploads 28-400 px, either polarity, through `prepare_upload`;
- batch: the inbox's .npz pixels, whose table keeps digit and confidence only (no image statistics).
Clean: `--windows` windows per path: false alarms, info findings, and whether the realised accuracy lies in
the CBPE estimate's interval. Shifted (`--shifted-windows` windows per case and path): rotated 25 degrees,
blurred (sigma 1.2), noisy (sigma 0.3), thick strokes (3x3 dilation), class mix skewed to two digits (0 and 1),
and preprocessing broken after deployment (the recipe without centring, or without polarity detection, as
`test_serving_check` breaks it; on the upload path only: JSON pixels and .npz arrays pass through the recipe
untouched). Each window is "detected as required" when it is an alarm where its realised accuracy fell >= 1
point below the path's clean mean, else an info finding (which names what changed). A last table runs milder
shifts the same way, to show where detection ends (not part of the acceptance).

Time on the 2-core machine: about 3 minutes with a cached model (most of it the upload windows: 1,000 PNGs
rendered and decoded each), plus about 3 minutes of training without one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.lifecycle.reference import build_serving_reference, judged_indices
from mnist_dagster.ml import drift
from mnist_dagster.ml.cbpe import realised_accuracy
from mnist_dagster.scoring import preprocess
from mnist_dagster.scoring.bundle import Predictor, make_bundle
from mnist_dagster.scoring.uploads import as_uploads, through_upload_recipe, typical_styles

WINDOW = 1000
PATHS = ("json", "upload", "batch")


VALIDATION_FRACTION, SPLIT_SEED = 1 / 12, 0  # `ProcessingConfig`'s defaults: 55k train / 5k validation


def real_mnist(sources: list[str]) -> dict:
    """The four files, fetched and md5-checked as `raw_mnist_data` does, as tensors."""
    from mnist_dagster.ml import data

    with tempfile.TemporaryDirectory() as folder:
        data.fetch_mnist(sources, Path(folder))
        return data.read_mnist(Path(folder))


def served_model(raw: dict, epochs: int | None, cache: Path) -> Predictor:
    """The graph the endpoint would serve (trained and calibrated by `ml.train.fit`), or the one in `cache`."""
    if not cache.exists():
        from mnist_dagster.ml import data, model, train
        from mnist_dagster.ml.config import TrainingConfig

        config = TrainingConfig() if epochs is None else TrainingConfig(epochs=epochs)
        trained = train.fit(data.normalise_and_split(raw, VALIDATION_FRACTION, SPLIT_SEED), config, "cpu")
        print(f"trained cnn-fast (TrainingConfig defaults{'' if epochs is None else ' but --epochs'}), {config.epochs} "
              f"epochs; temperature {trained.temperature:.3f} fitted by fit on the validation split")  # fmt: skip
        cache.write_bytes(model.export_onnx(trained.checkpoint))
    return Predictor(make_bundle("bench", cache.read_bytes()))


def as_json(digits: np.ndarray) -> np.ndarray:
    return digits.astype(np.float32) / 255


def as_upload(digits: np.ndarray, seed: int) -> np.ndarray:
    return through_upload_recipe(as_uploads(digits, typical_styles(len(digits), seed)))


def unit_to_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)


PERTURBED: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {  # the acceptance's cases, (images, seed)
    "rotated 25°": lambda x, _: drift.rotate(x, 25),
    "blurred σ=1.2": lambda x, _: drift.blur(x, 1.2),
    "noisy σ=0.3": lambda x, seed: drift.add_noise(x, 0.3, seed=seed),
    "thick strokes 3x3": lambda x, _: drift.thicken(x, 3),
}
MILDER: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {  # not the acceptance: where detection ends
    "rotated 15°": lambda x, _: drift.rotate(x, 15),
    "blurred σ=0.8": lambda x, _: drift.blur(x, 0.8),
    "noisy σ=0.15": lambda x, seed: drift.add_noise(x, 0.15, seed=seed),
    "thick strokes 2x2": lambda x, _: drift.thicken(x, 2),
    "thin strokes 2x2": lambda x, _: drift.erode(x, 2),
}
OFF_CENTRE = ("off-centre by 3 px", lambda x, _: drift.shift(x, 3))  # pixel paths: the upload recipe re-centres
SKEWED_DIGITS = (0, 1)


def _top_left(box: np.ndarray) -> np.ndarray:
    """A recipe that lost its centring: the scaled digit pasted at the field's top-left corner."""
    field = np.zeros((28, 28), np.float32)
    field[: box.shape[0], : box.shape[1]] = box
    return field


BROKEN = {  # name: (function of scoring.preprocess replaced, replacement), as test_serving_check breaks it
    "preprocessing broken after deployment: no centring": ("_centre_by_mass", _top_left),
    "preprocessing broken after deployment: no polarity detection": ("_border", lambda _: np.zeros(4, np.float32)),
}


@contextmanager
def broken_recipe(name: str | None) -> Iterator[None]:
    """The upload recipe with one of its steps replaced (`BROKEN[name]`) while the block runs; None: as it is."""
    if name is None:
        yield
        return
    target, replacement = BROKEN[name]
    original = getattr(preprocess, target)
    setattr(preprocess, target, replacement)
    try:
        yield
    finally:
        setattr(preprocess, target, original)


@dataclass
class Case:
    """A kind of traffic judged on one path: its digits drawn from `pool`, perturbed by `perturb`, through the
    upload recipe broken by `broken`."""

    name: str
    path: str
    pool: np.ndarray
    perturb: Callable[[np.ndarray, int], np.ndarray] | None = None
    broken: str | None = None


@dataclass
class Tally:
    """The verdicts of one case's windows, beside each window's realised accuracy."""

    verdicts: list[str] = field(default_factory=list)
    alarms: int = 0
    severe: int = 0
    infos: int = 0
    named: set[str] = field(default_factory=set)
    detected: int = 0
    estimated: list[float] = field(default_factory=list)
    realised: list[float] = field(default_factory=list)
    covered: int = 0  # windows whose realised accuracy lies in the estimate's interval

    def add(self, report: drift.DriftReport, truth, baseline: float) -> None:
        self.alarms += report.drift_detected
        self.severe += report.severity == "severe"
        self.infos += report.severity == "info"
        if report.severity == "info":
            self.named |= {s.name for s in report.moved()}
        harmful = baseline - truth.accuracy >= 0.01
        self.detected += report.drift_detected if harmful else report.severity != "none"
        self.estimated.append(report.estimate.accuracy)
        self.realised.append(truth.accuracy)
        self.covered += report.estimate.low <= truth.accuracy <= report.estimate.high

    def verdict(self) -> str:
        parts = [f"alarm {self.alarms} ({self.severe} severe)"] if self.alarms else []
        parts += [f"info {self.infos} ({', '.join(sorted(self.named))})"] if self.infos else []
        quiet = len(self.realised) - self.alarms - self.infos
        return "; ".join(parts + ([f"quiet {quiet}"] if quiet else []))


def judge(model: Predictor, reference: drift.DriftReference, case: Case, chosen: np.ndarray, raw: dict, seed: int):
    """One window (`chosen` test digits) of `case` -> (report, realised accuracy)."""
    digits, labels = raw["test_images"][chosen], raw["test_labels"][chosen]
    if case.perturb is not None:
        digits = unit_to_uint8(case.perturb(as_json(digits), seed))
    with broken_recipe(case.broken):
        images = as_upload(digits, seed) if case.path == "upload" else as_json(digits)
    probabilities = model.predict_proba(images.reshape(-1, 1, 28, 28))
    answers, confidences = probabilities.argmax(axis=1), probabilities.max(axis=1)
    report = drift.compare(
        reference.for_input(case.path), answers, confidences, None if case.path == "batch" else images
    )  # the batch tables keep digit and confidence only
    return report, realised_accuracy(int((answers == labels).sum()), len(labels))


def run_case(model, reference, case: Case, raw: dict, windows: int, seed: int, baseline: float) -> Tally:
    tally = Tally()
    rng = np.random.default_rng(seed)
    for index in range(windows):
        chosen = rng.choice(case.pool, WINDOW, replace=False)
        tally.add(*judge(model, reference, case, chosen, raw, seed + index), baseline)
    return tally


def rate(count: int, total: int) -> str:
    return f"{count}/{total} ({count / total:.0%})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainingConfig's")
    parser.add_argument("--windows", type=int, default=20, help="clean windows per path")
    parser.add_argument("--shifted-windows", type=int, default=5, help="windows per shifted case and path")
    parser.add_argument("--model", type=Path, default=Path(tempfile.gettempdir()) / "drift-benchmark-cnn-fast.onnx")
    args = parser.parse_args()

    from mnist_dagster.ml.data import parse_sources

    tensors = real_mnist(parse_sources(os.environ.get("MNIST_MIRRORS")))
    model = served_model(tensors, args.epochs, args.model)
    raw = {name: tensor.numpy() for name, tensor in tensors.items()}
    started = time.perf_counter()
    reference = build_serving_reference(model, raw["test_images"])
    print(f"served graph {args.model} (calibration inside); reference built in {time.perf_counter() - started:.1f} s")
    for kind, path_reference in reference.paths.items():
        print(f"reference {kind}: {path_reference.source}; estimated accuracy {path_reference.expected_accuracy:.2%}")
    pool = judged_indices(len(raw["test_labels"]))  # judged windows never touch the reference's images
    skewed = pool[np.isin(raw["test_labels"][pool], SKEWED_DIGITS)]

    print(f"\n## Clean windows ({args.windows} per path, 1,000 test digits each, disjoint from the reference)\n")
    print(
        "| path | windows | alarms (false) | info findings | what the info named | estimated (mean) | realised (mean) "
        "| realised in the estimate's interval |"
    )
    print("|---|---|---|---|---|---|---|---|")
    baseline = {}
    for number, path in enumerate(PATHS):
        tally = run_case(model, reference, Case("clean", path, pool), raw, args.windows, 1000 * (number + 1), 1.0)
        baseline[path] = float(np.mean(tally.realised))
        print(
            f"| {path} | {args.windows} | {rate(tally.alarms, args.windows)} | {rate(tally.infos, args.windows)} | "
            f"{', '.join(sorted(tally.named)) or '-'} | {np.mean(tally.estimated):.2%} | {baseline[path]:.2%} | "
            f"{rate(tally.covered, args.windows)} |"
        )

    cases = [Case(name, path, pool, perturb) for name, perturb in PERTURBED.items() for path in PATHS]
    cases += [Case(f"class mix: digits {' and '.join(map(str, SKEWED_DIGITS))} only", path, skewed) for path in PATHS]
    cases += [Case(name, "upload", pool, broken=name) for name in BROKEN]  # pixels pass the recipe untouched
    hits = shifted_table("Shifted windows (the acceptance's cases)", cases, model, reference, raw, args, baseline)
    total = len(cases) * args.shifted_windows
    print(f"\ndetected as required: {rate(hits, total)} shifted windows")
    milder = [Case(name, path, pool, perturb) for name, perturb in MILDER.items() for path in PATHS]
    milder += [Case(OFF_CENTRE[0], path, pool, OFF_CENTRE[1]) for path in ("json", "batch")]
    shifted_table("Milder shifts (not the acceptance: where detection ends)", milder, model, reference, raw, args,
                  baseline, first_seed=50_000)  # fmt: skip


def shifted_table(title, cases, model, reference, raw, args, baseline, first_seed: int = 5000) -> int:
    """Each case's windows judged and printed as a table row; returns the windows detected as required."""
    n = args.shifted_windows
    print(f"\n## {title}: {n} windows of 1,000 per case and path\n")
    print(
        "| case | path | verdicts | estimated (mean) | realised (mean) | realised drop (mean) | realised in the "
        "estimate's interval | detected as required |"
    )
    print("|---|---|---|---|---|---|---|---|")
    hits = 0
    for number, case in enumerate(cases):
        tally = run_case(model, reference, case, raw, n, first_seed + 100 * number, baseline[case.path])
        hits += tally.detected
        drop = baseline[case.path] - float(np.mean(tally.realised))
        print(
            f"| {case.name} | {case.path} | {tally.verdict()} | {np.mean(tally.estimated):.2%} | "
            f"{np.mean(tally.realised):.2%} | {drop * 100:+.2f} pts | {rate(tally.covered, n)} | "
            f"{rate(tally.detected, n)} |"
        )
    return hits


if __name__ == "__main__":
    main()
