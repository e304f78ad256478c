"""Models and servers for the inference tests: small models trained in seconds, a real uvicorn process.

Trained models are cached per process (`functools.cache`), so every test module that asks for one
(directly or through the fixtures in `serving_fixtures.py`) shares one training each; the real-data model
is also shared by the run's xdist workers (`shared_by_workers`), so it is trained once per run, not once per core.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from filelock import FileLock

from mnist_dagster.scoring.bundle import Bundle, Predictor, make_bundle
from mnist_dagster_tests.support import FAST_TRAINING, free_port, generated_digits


def train_bundle(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    version: str,
    **training: object,
) -> Bundle:
    """Train through `ml.train.fit`, as `digit_classifier` does; the bundle records its real test accuracy."""
    import torch

    from mnist_dagster.ml import data, model
    from mnist_dagster.ml.config import TrainingConfig
    from mnist_dagster.ml.train import fit

    raw = {
        "train_images": torch.from_numpy(train[0]),
        "train_labels": torch.from_numpy(train[1].astype(np.int64)),
        "test_images": torch.from_numpy(test[0]),
        "test_labels": torch.from_numpy(test[1].astype(np.int64)),
    }
    split = data.normalise_and_split(raw, val_fraction=0.1, seed=0)
    onnx = model.export_onnx(fit(split, TrainingConfig.from_mapping(training)).checkpoint)
    unversioned = make_bundle(version, onnx)
    accuracy = float((predict_digits(Predictor(unversioned), test[0]) == test[1]).mean())
    return make_bundle(version, onnx, test_accuracy=accuracy)


def predict_digits(predictor: Predictor, images: np.ndarray) -> np.ndarray:
    return predictor.predict_proba(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255).argmax(axis=1)


@functools.cache
def generated_model(version: str = "1") -> Bundle:
    """A tiny CNN on the generated digits (about a second): for tests that need a model, not a good one."""
    return train_bundle(
        generated_digits(1200, seed=1), generated_digits(300, seed=2), version, **FAST_TRAINING
    )


def untrained_bundle(version: str, claimed_accuracy: float) -> Bundle:
    """A random-weight model whose manifest claims an accuracy it does not have."""
    from mnist_dagster.ml import architectures, model
    from mnist_dagster.ml.config import TrainingConfig

    params = architectures.params_of("cnn", TrainingConfig.from_mapping(FAST_TRAINING))
    network = architectures.build("cnn", params)
    onnx = model.export_onnx(model.make_checkpoint(network, "cnn", params, 0.1, 0.3))
    return make_bundle(version, onnx, test_accuracy=claimed_accuracy)


@functools.cache
def real_test_set(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of real MNIST, uint8 and int64."""
    from mnist_dagster.ml.data import MNIST_FILES, read_mnist

    with tempfile.TemporaryDirectory() as folder:  # read_mnist decompresses beside the files: not in shared/
        for name in MNIST_FILES:
            shutil.copy(mnist_dir / name, folder)
        tensors = read_mnist(Path(folder))
    return tuple(tensors[name].numpy() for name in ("train_images", "train_labels", "test_images", "test_labels"))


#: A folder every xdist worker of this run sees (set by `serving_fixtures.shared_folder_of_the_run`), or None.
SHARED_FOLDER: Path | None = None


def shared_by_workers(name: str, build: Callable[[], Bundle]) -> Bundle:
    """One build per test run, whichever xdist worker asks first; the others wait on the lock and read it.

    Training is deterministic for its seed (the same model on every executor), so reading the first worker's
    bundle is the same as training it again. Without a shared folder (no xdist) it simply builds.
    """
    if SHARED_FOLDER is None:
        return build()
    saved = SHARED_FOLDER / f"{name}.pickle"
    with FileLock(SHARED_FOLDER / f"{name}.lock"):
        if not saved.exists():
            saved.write_bytes(pickle.dumps(build()))
        return pickle.loads(saved.read_bytes())


@functools.cache
def real_model(mnist_dir: Path, version: str = "1") -> Bundle:
    """The production architecture (TrainingConfig defaults), one epoch on 10k real images: ~97% in seconds."""

    def train() -> Bundle:
        train_images, train_labels, test_images, test_labels = real_test_set(mnist_dir)
        first_10k = (train_images[:10_000], train_labels[:10_000])
        return train_bundle(first_10k, (test_images, test_labels), version, epochs=1)

    return shared_by_workers(f"real-model-v{version}", train)


@contextmanager
def running_server(store_dir: Path, *extra_args: str, poll_seconds: float = 0.2) -> Iterator[str]:
    """`mnist-dagster serve` as a real process on 127.0.0.1; yields its base URL, stops it gracefully.

    The free port is chosen before the server binds it, so a process of another xdist worker can take it in
    between (seen once in CI: `[Errno 98] ... address already in use`); then it starts again on another port."""
    for attempt in range(3):
        port = free_port()
        command = [
            sys.executable, "-m", "mnist_dagster.serving.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--store", str(store_dir), "--poll-seconds", str(poll_seconds), *extra_args,
        ]  # fmt: skip
        log_path = store_dir.parent / f"server-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        try:
            _wait_until_listening(f"http://127.0.0.1:{port}", process, log_path)
            break
        except RuntimeError as error:
            if "address already in use" not in str(error) or attempt == 2:
                raise
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully: lifespan ends, the log flushes
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_until_listening(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            httpx.get(f"{url}/health", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start within {timeout} s:\n{log_path.read_text()}")

