"""The serving bundle: the one model format every prediction path uses.

A bundle is `model.onnx` (raw pixels in [0, 1] -> probabilities; normalisation is inside the graph)
plus `bundle.json` (version, provenance, input contract, checksum), stored under `<root>/<version>/`.
`<root>/CURRENT.json` names the live version and is written last, so publishing is atomic: a reader
sees the previous bundle or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mnist_dagster.storage import Store

BUNDLE_FORMAT = "mnist-dagster/serving-bundle-v1"
POINTER = "CURRENT.json"
INPUT_CONTRACT = {
    "name": "pixels",
    "dtype": "float32",
    "shape": ["batch", 1, 28, 28],
    "range": [0.0, 1.0],
    "polarity": "white digit on black background (MNIST); invert black-on-white drawings first",
}




def describe_input() -> str:
    """The input contract in words, for the MLflow model version a user loads without this code."""
    return (
        "ONNX digit classifier. Input `pixels`: float32 array of shape (N, 1, 28, 28) with values in [0, 1] "
        "(grey level / 255), white digit on black background, MNIST-style (centred, ~20 px box). Raw 0-255 "
        "values are NOT rejected but give wrong answers. Output `probabilities`: float32 (N, 10), one row per "
        "image, digits 0-9; the normalisation is inside the graph.\n\n"
        "    model = mlflow.pyfunc.load_model('models:/<name>@production')\n"
        "    probabilities = model.predict(pixels)['probabilities']  # pixels: np.float32 (N, 1, 28, 28) in [0, 1]"
    )


class BundleError(ValueError):
    """A bundle that is missing, incomplete, or fails its checksum or self-test."""


@dataclass(frozen=True)
class Bundle:
    version: str
    onnx: bytes
    manifest: dict[str, Any] = field(default_factory=dict)


def make_bundle(version: str, onnx: bytes, **provenance: Any) -> Bundle:
    manifest = {
        "format": BUNDLE_FORMAT,
        "model_version": version,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "onnx_sha256": hashlib.sha256(onnx).hexdigest(),
        "input": INPUT_CONTRACT,
        "output": {"name": "probabilities", "shape": ["batch", 10]},
        **provenance,
    }
    return Bundle(version=version, onnx=onnx, manifest=manifest)


def publish(store: Store, root: str, bundle: Bundle) -> None:
    """Write the bundle's files, then flip the pointer to it."""
    store.write_bytes(f"{root}/{bundle.version}/model.onnx", bundle.onnx)
    store.write_bytes(f"{root}/{bundle.version}/bundle.json", json.dumps(bundle.manifest, indent=2).encode())
    store.write_bytes(f"{root}/{POINTER}", json.dumps({"version": bundle.version}).encode())


def current_version(store: Store, root: str) -> str | None:
    if not store.exists(f"{root}/{POINTER}"):
        return None
    return str(json.loads(store.read_bytes(f"{root}/{POINTER}"))["version"])


def load(store: Store, root: str, version: str) -> Bundle:
    """Read and verify one bundle; raises `BundleError` rather than returning something half-valid."""
    try:
        manifest = json.loads(store.read_bytes(f"{root}/{version}/bundle.json"))
        onnx = store.read_bytes(f"{root}/{version}/model.onnx")
    except Exception as error:  # noqa: BLE001 - missing file, bad JSON, storage error: all mean "unusable"
        raise BundleError(f"bundle {version!r} under {root!r} is unreadable: {error}") from error
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle {version!r} has format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    if hashlib.sha256(onnx).hexdigest() != manifest.get("onnx_sha256"):
        raise BundleError(f"bundle {version!r}: model.onnx does not match its checksum")
    return Bundle(version=str(manifest["model_version"]), onnx=onnx, manifest=manifest)


def load_current(store: Store, root: str) -> Bundle | None:
    version = current_version(store, root)
    return None if version is None else load(store, root, version)


class Predictor:
    """ONNX Runtime inference over a verified bundle; checks itself on load so a broken model never serves."""

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle ONNX threads sleep instead of spinning: spinning steals the CPU the HTTP server needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(bundle.onnx, options, providers=["CPUExecutionProvider"])
            probabilities = self.predict_proba(np.zeros((1, 1, 28, 28), np.float32))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BundleError(f"bundle {bundle.version!r} does not load as a model: {error}") from error
        if probabilities.shape != (1, 10) or not np.isfinite(probabilities).all():
            raise BundleError(f"bundle {bundle.version!r} fails its self-test (output {probabilities.shape})")
        self.bundle = bundle
        self.version = bundle.version

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """`pixels`: float32 (N, 1, 28, 28) in [0, 1] -> probabilities (N, 10)."""
        return self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})[0]
