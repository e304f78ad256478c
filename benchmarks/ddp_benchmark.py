"""DDP benchmark: the same config trained in one process and data-parallel on N torchrun workers, on real MNIST.

    python benchmarks/ddp_benchmark.py [--mnist DIR] [--processes 2] [--candidate cnn-fast]

Both runs go through `mnist_dagster.ml` exactly as the `digit_classifier` asset does: `train.fit` in this
process, and `ml.distributed`'s torchrun launch (`--standalone --nproc_per_node=N`, gloo on CPU) for the
data-parallel run, whose rank 0 writes the checkpoint. Test accuracy on the 10k test set for both, and
the training time each reports (the DDP wall time also counts torchrun starting N Python processes).
Prints a Markdown table for the README.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.ml import data, distributed, train  # noqa: E402
from mnist_dagster.ml.config import candidate  # noqa: E402
from mnist_dagster.ml.model import load_checkpoint  # noqa: E402


def single_process(split: data.NormalisedSplit, config) -> dict:
    started = time.perf_counter()
    trained = train.fit(split, config, "cpu")
    wall = time.perf_counter() - started
    accuracy = train.accuracy(trained.model, split.test_images, split.test_labels)
    return {"run": "1 process", "test_accuracy": accuracy, "training_seconds": trained.seconds, "wall_seconds": wall}


def data_parallel(split: data.NormalisedSplit, config, processes: int, work: Path) -> dict:
    torch.save(split.as_dict(), work / "split.pt")
    command = distributed.launch_command(
        processes, work / "split.pt", config.as_params(), work / "checkpoint.pt", "cpu", True,
        work / "failures.json", work / "logs",
    )  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"DDP run failed:\n{done.stderr[-4000:]}")
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = next(r for r in reports if r["kind"] == distributed.RESULT)
    model, _ = load_checkpoint(torch.load(work / "checkpoint.pt", weights_only=True))
    accuracy = train.accuracy(model, split.test_images, split.test_labels)
    return {"run": f"DDP, {processes} processes (gloo)", "test_accuracy": accuracy,
            "training_seconds": result["seconds"], "wall_seconds": wall}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--candidate", default="cnn-fast")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        data.fetch_mnist([str(args.mnist)], Path(cache))
        raw = data.read_mnist(Path(cache))
    split = data.normalise_and_split(raw, 1 / 12, seed=0)
    config = candidate(args.candidate)
    rows = [single_process(split, config)]
    with tempfile.TemporaryDirectory(prefix="ddp-benchmark-") as work:
        rows.append(data_parallel(split, config, args.processes, Path(work)))
    gap = (rows[1]["test_accuracy"] - rows[0]["test_accuracy"]) * 100
    print(f"\n{args.candidate} ({config.epochs} epochs, batch {config.batch_size}, seed {config.seed}), "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")  # fmt: skip
    print("| run | test accuracy | training time | wall time |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | {row['test_accuracy']:.2%} | {row['training_seconds']:.1f} s | {row['wall_seconds']:.1f} s |")
    print(f"\nDDP - single process: {gap:+.2f} points")


if __name__ == "__main__":
    main()
