"""Model zoo benchmark: the leaderboard. Every named candidate trained on real MNIST on this machine, side by
side, in one run.

    python benchmarks/model_zoo_benchmark.py [--mnist DIR] [--candidates a,b] [--seeds N] [--epochs N]
                                             [--train-images N] [--skip-endpoint] [--yardstick-fraction F]

For each candidate (`ml.config.CANDIDATES`) and seed (0..N-1): `ml.train.fit` on the asset's split (55k train /
5k validation, seed 0), then on the 10k test set: accuracy, calibration error (ECE, 15 equal-width bins) before
and after the fitted temperature, accuracy under each condition of the evaluation's robustness table
(`ml.robustness.all_perturbations`: noise, rotations, shift, other hands and uploads at fixed strengths; the
leaderboard shows the worst, a second table each), training seconds and their ratio to the yardstick (one epoch
of pytorch/examples' MNIST recipe, timed in the same run by `training_benchmark.yardstick_epoch_seconds`),
parameters, and the single-image latency of the real endpoint (`mnist-dagster serve` on 127.0.0.1, PNG bodies,
keep-alive, p50 over 300 requests after a warm-up) for seed 0.

`--epochs N` trains every candidate N epochs instead of its own and `--train-images N` on the first N training
images (a shared machine: time one epoch, or a subset); the output says so, and such figures are estimates of
the candidates, not their results.
"""

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from inference_benchmark import http_request, sequential_latencies, start_ours, stop  # noqa: E402
from training_benchmark import yardstick_epoch_seconds  # noqa: E402

from mnist_dagster.ml import calibrate, data, train  # noqa: E402
from mnist_dagster.ml.config import CANDIDATES, TrainingConfig  # noqa: E402
from mnist_dagster.ml.model import export_onnx  # noqa: E402
from mnist_dagster.ml.robustness import all_perturbations
from mnist_dagster.ml.train import fit  # noqa: E402
from mnist_dagster.scoring.bundle import make_bundle  # noqa: E402
from mnist_dagster.scoring.preprocess import encode_png  # noqa: E402

TARGETS = {  # candidate: (test accuracy at least, training seconds at most)
    "cnn-fast": (0.994, 45),
    "cnn-robust": (0.994, 45),
    "cnn-accurate": (0.9965, 15 * 60),
    "resnet": (0.996, 15 * 60),
    "vit": (0.992, 15 * 60),
    "ensemble": (0.997, float("inf")),
}
ECE_TARGET = 0.005
ROBUSTNESS_TARGET = 0.97


def real_split(folder: Path) -> data.NormalisedSplit:
    """The split `processed_mnist_data` makes by default: 55k/5k stratified with seed 0, the 10k test set."""
    with tempfile.TemporaryDirectory() as cache:
        data.fetch_mnist([str(folder)], Path(cache))  # verifies the md5s
        return data.normalise_and_split(data.read_mnist(Path(cache)), val_fraction=1 / 12, seed=0)


def endpoint_p50_ms(onnx: bytes, test_images: np.ndarray, requests: int = 300) -> float:
    """p50 of single PNG requests to a real `mnist-dagster serve` over keep-alive HTTP on loopback."""
    with tempfile.TemporaryDirectory() as folder:
        process, port = start_ours(make_bundle("benchmark", onnx), Path(folder))
        try:
            bodies = [http_request(port, "/predict", "image/png", encode_png(image)) for image in test_images[:100]]
            return float(np.percentile(sequential_latencies(port, bodies, requests, warmup=100), 50)) * 1000
        finally:
            stop(process)


def robustness(model: torch.nn.Module, split: data.NormalisedSplit, seed: int = 0) -> dict[str, float]:
    """Test accuracy under each condition of the evaluation's robustness table (`ml.robustness.all_perturbations`:
    noise, rotations, shift, and other hands and uploads at fixed strengths), drawn from `seed`."""
    pixels = (split.test_images * split.std + split.mean).clamp(0, 1)
    scores = {}
    for name, perturbed in all_perturbations(pixels, seed).items():
        logits = train.predict_logits(model, (perturbed - split.mean) / split.std)
        scores[name] = (logits.argmax(1) == split.test_labels).double().mean().item()
    return scores


def measure(name: str, config: TrainingConfig, split: data.NormalisedSplit, raw_test: np.ndarray, endpoint: bool) -> dict:
    print(f"training {name}: {config}", flush=True)
    trained = fit(split, config, device="cpu")
    logits = train.predict_logits(trained.model.network, split.test_images)
    row = {
        "name": name, "seed": config.seed, "epochs": config.epochs, "parameters": trained.parameters,
        "test_accuracy": (logits.argmax(1) == split.test_labels).double().mean().item(),
        "ece_before": calibrate.expected_calibration_error(logits.softmax(1), split.test_labels),
        "ece": calibrate.expected_calibration_error(calibrate.apply_temperature(logits, trained.temperature), split.test_labels),
        "seconds": trained.seconds, "robustness": robustness(trained.model, split),
        "p50_ms": endpoint_p50_ms(export_onnx(trained.checkpoint), raw_test) if endpoint else float("nan"),
    }  # fmt: skip
    print(f"  -> {row}", flush=True)
    return row


def leaderboard(rows: list[dict], yardstick: float) -> None:
    """One line per candidate: the mean (and spread over seeds) of each figure; then each candidate's accuracy
    under every perturbation (mean over seeds)."""
    names = list(dict.fromkeys(row["name"] for row in rows))
    print(
        "\n| candidate | seeds | test accuracy (mean ± sd) | target | ECE before -> after | robustness (worst) "
        "| training time | vs yardstick | parameters | endpoint p50 | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        runs = [row for row in rows if row["name"] == name]
        accuracy = np.array([row["test_accuracy"] for row in runs])
        seconds = float(np.mean([row["seconds"] for row in runs]))
        spread = f" ± {100 * accuracy.std(ddof=1):.2f}" if len(runs) > 1 else ""
        target = TARGETS.get(name.split("/")[0], (float("nan"), float("nan")))[0]
        robust = mean_robustness(runs)
        worst = min(robust, key=robust.get)
        ece = [100 * np.mean([row[key] for row in runs]) for key in ("ece_before", "ece")]
        cells = [
            f"`{name}`", str(len(runs)), f"{100 * accuracy.mean():.2f}%{spread}", f">= {100 * target:.2f}%",
            f"{ece[0]:.2f}% -> {ece[1]:.2f}%", f"{100 * robust[worst]:.1f}% ({worst})", f"{seconds:.0f} s",
            f"{seconds / yardstick:.2f}x", f"{runs[0]['parameters']:,}", f"{runs[0]['p50_ms']:.2f} ms", verdict(runs, target),
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    conditions = list(rows[0]["robustness"])
    print("\n| candidate | " + " | ".join(conditions) + " |")
    print("|---|" + "---|" * len(conditions))
    for name in names:
        robust = mean_robustness([row for row in rows if row["name"] == name])
        print(f"| `{name}` | " + " | ".join(f"{100 * robust[c]:.1f}%" for c in conditions) + " |")


def mean_robustness(runs: list[dict]) -> dict[str, float]:
    """Each condition's accuracy, averaged over the runs (seeds)."""
    conditions = runs[0]["robustness"]
    return {condition: float(np.mean([row["robustness"][condition] for row in runs])) for condition in conditions}


def verdict(runs: list[dict], accuracy_target: float) -> str:
    """yes when the mean accuracy, every run's ECE and every perturbation meet their targets; else what missed."""
    missed = []
    if not np.mean([row["test_accuracy"] for row in runs]) >= accuracy_target:
        missed.append("accuracy")
    if max(row["ece"] for row in runs) > ECE_TARGET:
        missed.append("ECE")
    if min(min(row["robustness"].values()) for row in runs) < ROBUSTNESS_TARGET:
        missed.append("robustness")
    return "yes" if not missed else "NO: " + ", ".join(missed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per candidate (mean and spread)")
    parser.add_argument("--skip-endpoint", action="store_true")
    parser.add_argument("--epochs", type=int, default=None, help="override every candidate's epochs (timing runs)")
    parser.add_argument("--train-images", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--yardstick-fraction", type=float, default=1.0)
    args = parser.parse_args()
    split = real_split(args.mnist)
    if args.train_images:
        split = replace(split, train_images=split.train_images[: args.train_images], train_labels=split.train_labels[: args.train_images])
    raw_test = (split.test_images * split.std + split.mean).clamp(0, 1).mul(255).round().to(torch.uint8)[:, 0].numpy()
    started = time.perf_counter()
    yardstick = yardstick_epoch_seconds(split.train_images, split.train_labels, args.yardstick_fraction)
    rows = []
    for name in args.candidates.split(","):
        for seed in range(args.seeds):
            config = replace(CANDIDATES[name], epochs=args.epochs or CANDIDATES[name].epochs, seed=seed)
            rows.append(measure(name, config, split, raw_test, seed == 0 and not args.skip_endpoint))
    print(f"\nyardstick: one epoch of pytorch/examples' MNIST recipe on {len(split.train_labels)} images = {yardstick:.1f} s")
    if args.epochs or args.train_images:
        print(f"NOTE: every candidate trained {args.epochs or 'its own'} epochs on {len(split.train_labels)} images: estimates, not results")
    leaderboard(rows, yardstick)
    print(f"\n(whole run: {time.perf_counter() - started:.0f} s on {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
