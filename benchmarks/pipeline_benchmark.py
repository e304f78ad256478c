"""Materialize all, as a user runs it, against its own training time: the pipeline's overhead.

    python benchmarks/pipeline_benchmark.py [--old PATH ...] [--mnist DIR] [--runs cold,warm] [--epochs N]

Runs the real `dagster asset materialize -m mnist_dagster --select '*'` in a fresh `DAGSTER_HOME`, a fresh
`MNIST_DATA_DIR` (so a fresh MLflow SQLite store and empty caches) and `MNIST_MIRRORS` at a local copy of
the MNIST files: first cold (nothing cached), then warm (the same home and data folder again: parsed arrays
cached, a production model to compare with). Each step's duration comes from the run's event log (step
start to step success); `materialize_all` is the wall time of the whole command, process start included,
and `training_seconds` is what `digit_classifier` reports for `fit` alone. The ratio
`materialize_all / training_seconds` is the pipeline's overhead (issue 20's target: at most 1.3, warm).

With `--old PATH` (a checkout of an earlier commit, e.g. `git worktree add --detach /tmp/old <commit>`; repeat
it for several, labelled by their commits) the same runs are made with that code in the same invocation,
interleaved with the new ones, and printed side by side:
the machine is shared and its speed varies, so compare ratios taken in one run, not figures across days.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType  # not re-exported at the top level

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"
STEP_ORDER = ("raw_mnist_data", "processed_mnist_data", "digit_classifier", "model_evaluation")


@dataclass
class PipelineRun:
    label: str
    wall_seconds: float  # the command, from process start to exit
    run_seconds: float  # the Dagster run, RUN_START to RUN_SUCCESS
    steps: dict[str, float]  # step key -> seconds, STEP_START to STEP_SUCCESS
    training_seconds: float

    @property
    def ratio(self) -> float:
        return self.wall_seconds / self.training_seconds


def materialize_all(checkout: Path, home: Path, data_dir: Path, mnist: Path, label: str, epochs: int | None) -> PipelineRun:
    """One `dagster asset materialize --select '*'` of `checkout`'s code location, then its event log read."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "MNIST_DATA_DIR": str(data_dir),
        "MNIST_MIRRORS": str(mnist),
        "PYTHONPATH": str(checkout),
        "MNIST_DEVICE": "cpu",
    }
    for variable in ("MLFLOW_TRACKING_URI", "DAGSTER_DEPLOYMENT", "MNIST_EXECUTOR", "SLACK_BOT_TOKEN"):
        env.pop(variable, None)  # dev resources: the SQLite MLflow store inside MNIST_DATA_DIR, no Slack
    dagster = Path(sys.executable).parent / "dagster"
    command = [str(dagster), "asset", "materialize", "-m", "mnist_dagster", "--select", "*"]
    if epochs is not None:  # a shorter training: the same overhead over less learning, a harsher ratio
        command += ["--config-json", json.dumps({"ops": {"digit_classifier": {"config": {"epochs": epochs}}}})]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{label}: materialize failed ({finished.returncode}):\n{finished.stderr[-4000:]}")
    return read_run(home, label, wall)


def read_run(home: Path, label: str, wall: float) -> PipelineRun:
    """Per-step durations and the training time of the latest run in `home`'s event log."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (record,) = instance.get_run_records(limit=1)
        events = [entry for entry in instance.all_logs(record.dagster_run.run_id) if entry.is_dagster_event]
        starts: dict[str, float] = {}
        steps: dict[str, float] = {}
        run_start = run_end = None
        training = None
        for entry in events:
            kind = entry.dagster_event.event_type
            if kind == DagsterEventType.STEP_START:
                starts[entry.step_key] = entry.timestamp
            elif kind == DagsterEventType.STEP_SUCCESS:
                steps[entry.step_key] = entry.timestamp - starts[entry.step_key]
            elif kind == DagsterEventType.RUN_START:
                run_start = entry.timestamp
            elif kind == DagsterEventType.RUN_SUCCESS:
                run_end = entry.timestamp
            elif kind == DagsterEventType.ASSET_MATERIALIZATION and entry.step_key == "digit_classifier":
                training = entry.dagster_event.event_specific_data.materialization.metadata["training_seconds"].value
    return PipelineRun(label, wall, run_end - run_start, steps, float(training))


def run_side_by_side(checkouts: dict[str, Path], mnist: Path, runs: list[str], epochs: int | None) -> list[PipelineRun]:
    """Each checkout in its own fresh home and data folder; the runs interleaved (old cold, new cold, old
    warm, new warm), so a change in the machine's load falls on both alike. Warm reuses what cold left."""
    results = []
    with tempfile.TemporaryDirectory(prefix="pipeline-benchmark-") as folder:
        for run in runs:
            for label, checkout in checkouts.items():
                home, data_dir = Path(folder) / label / "dagster_home", Path(folder) / label / "data"
                home.mkdir(parents=True, exist_ok=True)
                result = materialize_all(checkout, home, data_dir, mnist, f"{label} {run}", epochs)
                print(f"{result.label}: {result.wall_seconds:.1f} s, training {result.training_seconds:.1f} s, "
                      f"ratio {result.ratio:.2f}", flush=True)  # fmt: skip
                results.append(result)
    order = list(checkouts)
    return sorted(results, key=lambda r: (order.index(r.label.split()[0]), runs.index(r.label.split()[1])))


def print_table(results: list[PipelineRun]) -> None:
    """Steps as rows, runs as columns (seconds), then the totals and the ratio."""
    keys = [*STEP_ORDER, *sorted({key for r in results for key in r.steps} - set(STEP_ORDER))]
    print("\n| step | " + " | ".join(r.label for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for key in keys:
        print(f"| `{key}` | " + " | ".join(f"{r.steps.get(key, float('nan')):.2f}" for r in results) + " |")
    others = [k for k in keys if k not in STEP_ORDER]
    print("| the other steps | " + " | ".join(f"{sum(r.steps.get(k, 0.0) for k in others):.2f}" for r in results) + " |")
    print("| training (`fit`) | " + " | ".join(f"{r.training_seconds:.2f}" for r in results) + " |")
    print("| around training (`digit_classifier` - fit) | "
          + " | ".join(f"{r.steps.get('digit_classifier', 0.0) - r.training_seconds:.2f}" for r in results) + " |")  # fmt: skip
    print("| Dagster run (start to success) | " + " | ".join(f"{r.run_seconds:.2f}" for r in results) + " |")
    print("| materialize_all (the command) | " + " | ".join(f"{r.wall_seconds:.2f}" for r in results) + " |")
    print("| not learning (materialize_all - training) | "
          + " | ".join(f"{r.wall_seconds - r.training_seconds:.2f}" for r in results) + " |")  # fmt: skip
    print("| **materialize_all / training_seconds** | " + " | ".join(f"**{r.ratio:.2f}**" for r in results) + " |")


def _commit_of(checkout: Path) -> str:
    """A checkout's label: its short commit (`old` when it is not a git checkout)."""
    found = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return found.stdout.strip() or "old"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, action="append", default=[], help="an older checkout, side by side (repeatable)")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help="folder with the four MNIST .gz files")
    parser.add_argument("--runs", default="cold,warm", help="cold, warm or both (warm reuses cold's folders)")
    parser.add_argument("--epochs", type=int, help="train this many epochs instead of the default candidate's 3")
    args = parser.parse_args()
    runs = args.runs.split(",")
    checkouts = {_commit_of(path): path.resolve() for path in args.old}
    print_table(run_side_by_side({**checkouts, "new": REPO_ROOT}, args.mnist, runs, args.epochs))


if __name__ == "__main__":
    main()
