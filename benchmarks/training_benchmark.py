"""Training benchmark: the default candidate (`cnn-fast`) against today's code and a yardstick, in one run.

    python benchmarks/training_benchmark.py [--mnist DIR] [--baseline DIR] [--repeats N]
                                            [--yardstick-fraction F] [--peers] [--skip-pipeline]

All on real MNIST, on this machine, side by side, so that the machine's other load falls on all of them:
- ours: the default `TrainingConfig` trained with seed 0, again with seed 0 (reproducibility: the same
  weights) and with seed 1, through the same `mnist_dagster.ml.fit` the `digit_classifier` asset runs;
  test accuracy on the 10k set and calibration error (ECE, 15 bins) before and after the temperature.
- baseline: with `--baseline DIR` (a checkout of an older commit, e.g. `git worktree add /tmp/old-ml main`),
  the default config trained by THAT code, in a subprocess, taking turns with ours `--repeats` times.
- yardstick: one epoch of pytorch/examples' MNIST recipe (its `Net`, Adadelta lr 1.0, batch 64, StepLR
  gamma 0.7; in-memory tensors, no DataLoader), timed here. Every training time is also given as a ratio
  to it, which holds from one machine to the next. `--yardstick-fraction F` times the first F of the epoch
  and scales it up (a shared machine); the output says which.
- peers (`--peers`): pytorch/examples' 14 epochs and Dagster's project_ml, per-epoch time from a slice of
  steady-state batches, with the accuracies they reach (~99.2% and 99.51% as measured with their own code).
- Materialize all: `dagster job execute` of the full pipeline in a fresh DAGSTER_HOME (unless --skip-pipeline).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.ml import calibrate, data, train  # noqa: E402
from mnist_dagster.ml.config import TrainingConfig  # noqa: E402


class PytorchExamplesNet(nn.Module):
    """pytorch/examples mnist/main.py: two 3x3 convs (32, 64), max-pool, dropout, 9216 -> 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)
        self.drop1, self.drop2 = nn.Dropout(0.25), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        x = self.drop2(F.relu(self.fc1(torch.flatten(self.drop1(x), 1))))
        return F.log_softmax(self.fc2(x), dim=1)


class ProjectMlCNN(nn.Module):
    """Dagster's project_ml DigitCNN: 5x5 convs (32, 64) + 3x3 conv 128 with BN, 1152 -> 256 -> 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int, pool: nn.Module) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU(), pool)

        self.features = nn.Sequential(
            block(1, 32, 5, nn.MaxPool2d(2)),
            block(32, 64, 5, nn.MaxPool2d(2)),
            nn.Dropout2d(0.1),
            block(64, 128, 3, nn.AdaptiveAvgPool2d(3)),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(1152, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


PEERS = {
    # name: (model factory, optimizer factory, batch size, epochs to its accuracy, train images per epoch, accuracy)
    "pytorch/examples mnist": (PytorchExamplesNet, lambda p: torch.optim.Adadelta(p, lr=1.0), 64, 14, 60_000, 0.992),
    "dagster project_ml": (ProjectMlCNN, lambda p: torch.optim.Adam(p, lr=1e-3), 64, 20, 48_000, 0.9951),
}


def peer_epoch_seconds(factory, make_optimizer, batch_size: int, images: torch.Tensor, labels: torch.Tensor,
                       epoch_size: int, batches: int = 120, warmup: int = 10) -> float:
    """Seconds per epoch, from the steady-state time of `batches` training steps."""
    torch.manual_seed(0)
    net = factory().train()
    optimizer = make_optimizer(net.parameters())
    started = 0.0
    for step in range(warmup + batches):
        if step == warmup:
            started = time.perf_counter()
        index = torch.randint(0, len(images), (batch_size,))
        loss = F.cross_entropy(net(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    per_image = (time.perf_counter() - started) / (batches * batch_size)
    return per_image * epoch_size


def yardstick_epoch_seconds(images: torch.Tensor, labels: torch.Tensor, fraction: float = 1.0) -> float:
    """One epoch of pytorch/examples' MNIST recipe on `images` (seconds; the first `fraction` of it, scaled up)."""
    torch.manual_seed(1)
    net = PytorchExamplesNet().train()
    optimizer = torch.optim.Adadelta(net.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    order = torch.randperm(len(images))
    steps = max(1, round(fraction * len(images) / 64))
    started = time.perf_counter()
    for step in range(steps):
        index = order[step * 64 : (step + 1) * 64]
        loss = F.nll_loss(net(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    schedule.step()
    return (time.perf_counter() - started) * len(images) / (steps * 64)


def train_ours(split: data.NormalisedSplit, seed: int) -> dict:
    """The default config with `seed`, as the asset trains it: accuracy, ECE before/after, seconds, weights' digest."""
    cpu_started = time.process_time()
    trained = train.fit(split, TrainingConfig(seed=seed), device="cpu")
    cpu_seconds = time.process_time() - cpu_started
    logits = train.predict_logits(trained.model.network, split.test_images)
    return {
        "code": "ours", "seed": seed, "training_seconds": trained.seconds, "cpu_seconds": cpu_seconds,
        "temperature": trained.temperature,
        "test_accuracy": (logits.argmax(1) == split.test_labels).double().mean().item(),
        "ece_before": calibrate.expected_calibration_error(logits.softmax(1), split.test_labels),
        "ece_after": calibrate.expected_calibration_error(calibrate.apply_temperature(logits, trained.temperature), split.test_labels),
        "weights": weights_digest(trained.checkpoint["state_dict"]),
    }  # fmt: skip


def weights_digest(state_dict: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode() + tensor.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


BASELINE_SCRIPT = """
import json, sys, tempfile, time
from pathlib import Path
from mnist_dagster.ml import data, evaluate, train
from mnist_dagster.ml.config import TrainingConfig
with tempfile.TemporaryDirectory() as cache:
    data.fetch_mnist([sys.argv[1]], Path(cache))
    split = data.normalise_and_split(data.read_mnist(Path(cache)), 1 / 12, seed=0)
cpu_started = time.process_time()
trained = train.fit(split, TrainingConfig(seed=0), device="cpu")
cpu_seconds = time.process_time() - cpu_started
accuracy = evaluate.evaluate(trained.model, split.test_images, split.test_labels).accuracy
print(json.dumps({"code": "baseline", "seed": 0, "training_seconds": trained.seconds, "cpu_seconds": cpu_seconds,
                  "test_accuracy": accuracy}))
"""


def train_baseline(code: Path, mnist: Path) -> dict:
    """The default config trained by the code in `code` (an older checkout), in a subprocess on the same data."""
    result = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, str(mnist)], env={**os.environ, "PYTHONPATH": str(code)},
                            cwd=code, check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def materialize_all_seconds(mnist_dir: Path) -> tuple[float, float, float]:
    """(wall seconds, training seconds, test accuracy) for the full pipeline job in a fresh instance."""
    import dagster as dg

    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "DAGSTER_HOME": home, "MNIST_DATA_DIR": data_dir, "MNIST_MIRRORS": str(mnist_dir),
               "MNIST_DEVICE": "cpu", "DAGSTER_DEPLOYMENT": "dev"}
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "dagster", "job", "execute", "-m", "mnist_dagster.definitions", "-j", "full_pipeline_job"],
            env=env, cwd=REPO_ROOT, check=True, capture_output=True,
        )
        wall = time.perf_counter() - started
        with dg.DagsterInstance.from_ref(dg._core.instance.InstanceRef.from_dir(home)) as instance:
            trained = instance.get_latest_materialization_event(dg.AssetKey("digit_classifier")).asset_materialization
            evaluated = instance.get_latest_materialization_event(dg.AssetKey("model_evaluation")).asset_materialization
            return wall, trained.metadata["training_seconds"].value, evaluated.metadata["test_accuracy"].value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout of the code to compare with")
    parser.add_argument("--repeats", type=int, default=1, help="baseline/ours turns (ours: seed 0 each turn)")
    parser.add_argument("--yardstick-fraction", type=float, default=1.0)
    parser.add_argument("--reproducibility", action="store_true", help="also train seed 0 again and seed 1")
    parser.add_argument("--peers", action="store_true", help="also time pytorch/examples' and project_ml's epochs")
    parser.add_argument("--skip-pipeline", action="store_true", help="skip the Materialize-all timing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        data.fetch_mnist([str(args.mnist)], Path(cache))
        raw = data.read_mnist(Path(cache))
    split = data.normalise_and_split(raw, 1 / 12, seed=0)
    results: dict = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "runs": []}
    yardstick = yardstick_epoch_seconds(split.train_images, split.train_labels, args.yardstick_fraction)
    for _ in range(args.repeats):
        if args.baseline:
            results["runs"].append(train_baseline(args.baseline, args.mnist))
            print(results["runs"][-1], flush=True)
        results["runs"].append(train_ours(split, 0))
        print(results["runs"][-1], flush=True)
    if args.reproducibility:
        results["runs"] += [train_ours(split, 0), train_ours(split, 1)]
    results["yardstick_epoch_seconds"] = yardstick
    print(json.dumps(results, indent=2))
    print(f"\nyardstick: one epoch of pytorch/examples' MNIST recipe = {yardstick:.1f} s"
          + ("" if args.yardstick_fraction == 1 else f" (timed on {args.yardstick_fraction:.0%} of it, scaled)"))
    print("\n| code | seed | test accuracy | ECE before -> after (T) | training time | CPU time | vs yardstick epoch | weights |")
    print("|---|---|---|---|---|---|---|---|")
    for run in results["runs"]:
        ece = f"{100 * run['ece_before']:.2f}% -> {100 * run['ece_after']:.2f}% ({run['temperature']:.3f})" if "ece_after" in run else "-"
        print(f"| {run['code']} | {run['seed']} | {100 * run['test_accuracy']:.2f}% | {ece} | {run['training_seconds']:.1f} s "
              f"| {run['cpu_seconds']:.1f} s | {run['training_seconds'] / yardstick:.2f}x | {run.get('weights', '-')} |")
    baseline = [run["training_seconds"] for run in results["runs"] if run["code"] == "baseline"]
    ours = [run["training_seconds"] for run in results["runs"] if run["code"] == "ours" and run["seed"] == 0]
    if baseline:
        ratio = (sum(ours) / len(ours)) / (sum(baseline) / len(baseline))
        print(f"\nours / baseline training time: {ratio:.2f}x wall (means of {len(ours)} and {len(baseline)} runs)")
        cpu = [sum(r["cpu_seconds"] for r in results["runs"] if r["code"] == code and r["seed"] == 0) for code in ("ours", "baseline")]
        print(f"ours / baseline CPU time: {cpu[0] / len(ours) / (cpu[1] / len(baseline)):.2f}x (the machine's other load does not count)")
    if args.peers:
        for name, (factory, optimizer, batch_size, epochs, epoch_size, accuracy) in PEERS.items():
            epoch = peer_epoch_seconds(factory, optimizer, batch_size, split.train_images, split.train_labels, epoch_size)
            print(f"| {name} ({epochs} epochs x {epoch:.1f} s measured) | ~{100 * accuracy:.2f}% | {epoch * epochs / 60:.1f} min "
                  f"| {epoch * epochs / yardstick:.1f}x yardstick |")
    if not args.skip_pipeline:
        wall, training, accuracy = materialize_all_seconds(args.mnist)
        print(f"| Materialize all (full_pipeline_job, fresh instance) | {100 * accuracy:.2f}% | {wall:.1f} s wall, "
              f"{training:.1f} s training | {wall / training:.2f}x training time |")


if __name__ == "__main__":
    main()
