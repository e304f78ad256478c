"""Training benchmark: our default config against the named peers, on real MNIST, on this machine, in one run.

    python benchmarks/training_benchmark.py [--mnist DIR] [--skip-pipeline]

Prints a Markdown table for the README:
- ours: the default `TrainingConfig` trained twice with seed 0 (reproducibility) and once with seed 1,
  through the same `mnist_dagster.ml` code the `digit_classifier` asset runs; test accuracy on the 10k set.
- peers: pytorch/examples' MNIST `Net` (Adadelta, batch 64, 14 epochs on 60k) and Dagster's project_ml
  `DigitCNN` (Adam, batch 64, stopped after 20 epochs on 48k when run with its defaults), re-implemented
  from their descriptions. Their per-epoch time is measured here on a slice of steady-state batches and
  multiplied by their epoch counts; their accuracies are the ones they reach with those settings
  (~99.2% and 99.51%, as measured on this machine with their own code). Their data loading and
  augmentation are left out, which flatters them.
- Materialize all: `dagster job execute` of the full pipeline in a fresh DAGSTER_HOME, wall time from
  process start to exit, against the training time it reports.
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
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from mnist_dagster.ml import data, evaluate, train  # noqa: E402
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


def train_ours(split: data.NormalisedSplit, seed: int) -> tuple[float, float]:
    """(test accuracy, training seconds) for the default config with `seed`, as the asset trains it."""
    trained = train.fit(split, TrainingConfig(seed=seed), device="cpu")
    return evaluate.evaluate(trained.model, split.test_images, split.test_labels).accuracy, trained.seconds


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
    parser.add_argument("--skip-pipeline", action="store_true", help="skip the Materialize-all timing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        data.fetch_mnist([str(args.mnist)], Path(cache))
        raw = data.read_mnist(Path(cache))
    split = data.normalise_and_split(raw, 1 / 12, seed=0)

    results = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    runs = [("seed 0", *train_ours(split, 0)), ("seed 0 again", *train_ours(split, 0)), ("seed 1", *train_ours(split, 1))]
    results["ours"] = [{"run": name, "test_accuracy": acc, "training_seconds": secs} for name, acc, secs in runs]
    ours_seconds = runs[0][2]

    peers = []
    for name, (factory, optimizer, batch_size, epochs, epoch_size, accuracy) in PEERS.items():
        epoch = peer_epoch_seconds(factory, optimizer, batch_size, split.train_images, split.train_labels, epoch_size)
        peers.append({"peer": name, "epoch_seconds": epoch, "epochs": epochs, "total_seconds": epoch * epochs,
                      "accuracy": accuracy, "ratio_vs_ours": epoch * epochs / ours_seconds})
    results["peers"] = peers

    if not args.skip_pipeline:
        wall, training, accuracy = materialize_all_seconds(args.mnist)
        results["materialize_all"] = {"wall_seconds": wall, "training_seconds": training, "test_accuracy": accuracy,
                                      "ratio": wall / training}

    print(json.dumps(results, indent=2))
    print("\n| what | test accuracy | training time | vs ours |\n|---|---|---|---|")
    for run in results["ours"]:
        print(f"| ours, default config, {run['run']} | {100 * run['test_accuracy']:.2f}% | {run['training_seconds']:.1f} s | |")
    for peer in peers:
        print(f"| {peer['peer']} ({peer['epochs']} epochs x {peer['epoch_seconds']:.1f} s measured) | "
              f"~{100 * peer['accuracy']:.2f}% | {peer['total_seconds'] / 60:.1f} min | {peer['ratio_vs_ours']:.0f}x slower |")
    if "materialize_all" in results:
        m = results["materialize_all"]
        print(f"| Materialize all (full_pipeline_job, fresh instance) | {100 * m['test_accuracy']:.2f}% | "
              f"{m['wall_seconds']:.1f} s wall, {m['training_seconds']:.1f} s training | {m['ratio']:.2f}x training time |")


if __name__ == "__main__":
    main()
