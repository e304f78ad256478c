"""The metrics beyond accuracy on real MNIST: what `model_evaluation` shows for a candidate, as README tables.

    python benchmarks/evaluation_benchmark.py [--mnist DIR] [--candidates cnn-fast,cnn-accurate]

Each candidate is trained by `ml.train.fit` on the asset's split (55k/5k, seed 0), then every default metric of
`ml/evaluate.py` runs on the 10k test set exactly as in the asset (same `Scored`, seed 0): calibration error,
the robustness table and the top confused pairs, scored
in one batched pass (`evaluate.score_in_one_pass`, as `model_evaluation` does).
"""

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from model_zoo_benchmark import real_split  # noqa: E402

from mnist_dagster.ml import evaluate  # noqa: E402
from mnist_dagster.ml.config import candidate  # noqa: E402
from mnist_dagster.ml.train import fit  # noqa: E402


def metrics_for(name: str, split) -> dict[str, evaluate.MetricResult]:
    trained = fit(split, candidate(name), device="cpu")
    started = time.perf_counter()
    temperature = float(trained.checkpoint.get("temperature", 1.0))
    result, scored = evaluate.score_in_one_pass(
        trained.model, split.test_images, split.test_labels, split.mean, split.std, temperature=temperature
    )
    metrics = evaluate.run_metrics(scored)
    print(f"{name}: test accuracy {100 * result.accuracy:.2f}%, trained in {trained.seconds:.1f} s; scored "
          f"{len(split.test_labels)} images x {1 + len(scored.perturbed_predictions)} conditions in one pass and every "
          f"metric in {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    return metrics


def print_tables(results: dict[str, dict[str, evaluate.MetricResult]]) -> None:
    names = list(results)
    print("\n| metric | " + " | ".join(f"`{name}`" for name in names) + " |")
    print("|---|" + "---|" * len(names))
    print("| expected calibration error | " + " | ".join(
        f"{100 * results[n]['calibration'].scalars['expected_calibration_error']:.2f}%" for n in names) + " |")
    print("| expected calibration error, before the temperature | " + " | ".join(
        f"{100 * results[n]['calibration'].scalars['expected_calibration_error_uncalibrated']:.2f}%" for n in names) + " |")
    for index, row in enumerate(results[names[0]]["robustness"].table):
        print(f"| accuracy, {row['condition']} | " + " | ".join(
            f"{100 * results[n]['robustness'].table[index]['accuracy']:.2f}%" for n in names) + " |")
    for name in names:
        pairs = ", ".join(f"{r['true']}->{r['predicted']} ({r['count']})" for r in results[name]["confused_pairs"].table)
        print(f"\ntop confused pairs, `{name}`: {pairs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--candidates", default="cnn-fast")
    args = parser.parse_args()
    split = real_split(args.mnist)
    started = time.perf_counter()
    print_tables({name: metrics_for(name, split) for name in args.candidates.split(",")})
    print(f"\n(whole run: {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
