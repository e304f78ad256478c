"""Plain helpers the tests import: where things are, generated MNIST-format data, a local HTTP mirror,
the code location's assets and a fast run config for them, and polling.

Everything but the real-data tests runs on generated digits: ten fixed random stroke patterns, one
per class, with noise and small shifts, written as the four gzipped IDX files a mirror serves.
Fixtures live in `conftest.py` and the plugin modules it lists; nothing here is a fixture.
"""

import gzip
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import dagster as dg
import numpy as np
import pytest

from mnist_dagster.ml.data import MNIST_FILES

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST_DIR = Path(os.environ.get("MNIST_TEST_DATA", REPO_ROOT.parent / "shared" / "data" / "mnist"))

#: Every asset of the code location, as the product names them.
PIPELINE_ASSETS = frozenset(
    {
        "raw_mnist_data",
        "processed_mnist_data",
        "digit_classifier",
        "model_evaluation",
        "production_digit_classifier",
        "batch_digit_predictions",
        "digit_predictions",
        "ab_test_report",
        "prediction_drift",
    }
)

#: A tiny CNN, two epochs: learns the generated digits in about a second. `digit_classifier`'s config
#: in FAST_RUN_CONFIG, and the training of the serving tests' models (`serving_support.py`).
FAST_TRAINING = {"channels": [4, 8], "hidden": 16, "epochs": 2, "batch_size": 64, "max_lr": 0.02}

#: Instance overrides for the tests' own instances: no capture of step stdout/stderr. Dagster's local compute-log
#: manager mirrors each step's output through a `tail -F` and a watcher process and, when the step ends, stops
#: each with SIGTERM and waits up to 30 s for it. The DDP killed-worker test took 62-74 s in full suite runs
#: against 10 s alone; with SIGTERM ignored in the test process (so in the `tail` it starts) it takes 68 s alone,
#: and `py-spy dump` shows the wait in `compute_logs._clean_up_subprocess`; with these overrides, 12 s. No test
#: reads compute logs; the `dagster dev` tests keep the repository's real instance settings.
NO_COMPUTE_LOGS = {
    "compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
}


#: Run config for a fast pipeline on generated data.
FAST_RUN_CONFIG = {
    "ops": {
        "digit_classifier": {"config": FAST_TRAINING},
        "processed_mnist_data": {"config": {"validation_fraction": 0.1}},
    }
}


def pipeline_assets_and_checks():
    """Every asset and asset check of the code location, for `dg.materialize`."""
    from mnist_dagster.definitions import ASSET_MODULES

    return dg.load_assets_from_modules(ASSET_MODULES), dg.load_asset_checks_from_modules(ASSET_MODULES)


# ----- generated MNIST-format data ---------------------------------------------------------------


def generated_digits(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` uint8 28x28 images of ten easily separable classes, and their labels."""
    templates = np.random.default_rng(1234).random((10, 28, 28)) > 0.8  # same classes for every split
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    rng.shuffle(labels)
    images = templates[labels] * rng.uniform(150, 255, (count, 1, 1)) + rng.normal(0, 20, (count, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def generated_split(count: int, seed: int, val_fraction: float, test_count: int = 200):
    """Generated digits as the asset's split: normalised, stratified train/validation, and a test set drawn
    from the same images (fine for checking mechanics, not accuracy)."""
    import torch

    from mnist_dagster.ml import data

    images, labels = generated_digits(count, seed)
    raw = {
        "train_images": torch.from_numpy(images),
        "train_labels": torch.from_numpy(labels).long(),
        "test_images": torch.from_numpy(images[:test_count]),
        "test_labels": torch.from_numpy(labels[:test_count]).long(),
    }
    return data.normalise_and_split(raw, val_fraction, seed=0)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """The IDX format MNIST uses: magic (type 0x08 = uint8, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as handle:
        handle.write(header + array.tobytes())


def write_mnist_mirror(folder: Path, n_train: int = 1200, n_test: int = 300) -> dict[str, str]:
    """The four MNIST files with generated content; returns their md5s (what `MnistSource.md5s` expects)."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = generated_digits(n_train, seed=1)
    test_images, test_labels = generated_digits(n_test, seed=2)
    arrays = {
        "train-images-idx3-ubyte.gz": train_images,
        "train-labels-idx1-ubyte.gz": train_labels,
        "t10k-images-idx3-ubyte.gz": test_images,
        "t10k-labels-idx1-ubyte.gz": test_labels,
    }
    assert set(arrays) == set(MNIST_FILES)
    for name, array in arrays.items():
        write_idx_gz(folder / name, array)
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in arrays}


# ----- local HTTP ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder without logging each request to the test output."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client closing early (torchvision probes each URL for redirects) is not news


@contextmanager
def serve_folder(folder: Path, handler: type[SimpleHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """An HTTP mirror of `folder` on 127.0.0.1 (what `MNIST_MIRRORS` points at); yields its base URL."""
    server = _QuietServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# ----- polling ------------------------------------------------------------------------------------


def finishes_within(action: Callable[[], T], timeout: float, what: str) -> T:
    """`action()`'s result, run in a thread; fails saying `what` hung if it has not returned after `timeout`
    seconds. For "does not hang" only: give it at least ten times the expected time, never a speed bound."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's own thread below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{what} did not return within {timeout:g} s: it hangs")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def wait_for(condition: Callable[[], T], timeout: float = 20, interval: float = 0.1, message: str = "condition") -> T:
    """Poll `condition()` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {message}")
