"""The serving bundle: the one model format every prediction path uses.

A bundle is `model.onnx` (raw pixels in [0, 1] -> probabilities; normalisation and the calibration
temperature are inside the graph) plus `bundle.json` (version, provenance, input contract, checksum),
stored once under `models/<version>/` (`layout.bundle_prefix`) and never changed. Which version serves is
the deployment record's business (`lifecycle/record.py`), written after the bundle, so a reader never
meets a version whose files are not all there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mnist_dagster.digits import IMAGE_SIDE, NUM_CLASSES
from mnist_dagster.layout import bundle_prefix
from mnist_dagster.storage import Store

BUNDLE_FORMAT = "mnist-dagster/serving-bundle-v1"
#: Images per ONNX Runtime call: the default CNN's activations for 256 images stay in the CPU's caches (38k
#: images on 2 cores, best of 4: 0.55 s in calls of 256, 0.72 s of 1,024, 0.78 s of 2,048; 10k in one call
#: is slower still), so a large array is scored in calls of this size.
PREDICT_CHUNK = 256
INPUT_CONTRACT = {
    "name": "pixels",
    "dtype": "float32",
    "shape": ["batch", 1, IMAGE_SIDE, IMAGE_SIDE],
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
        "output": {"name": "probabilities", "shape": ["batch", NUM_CLASSES]},
        **provenance,
    }
    return Bundle(version=version, onnx=onnx, manifest=manifest)


def store_bundle(store: Store, bundle: Bundle) -> None:
    """Write `bundle` under `models/<version>/`, the ONNX first and the manifest last (a reader checks both).
    Bundles are immutable: storing the same bundle again is a no-op (a retried step), a different one under
    a version already taken is refused."""
    prefix = bundle_prefix(bundle.version)
    if store.exists(f"{prefix}/bundle.json"):
        stored = json.loads(store.read_bytes(f"{prefix}/bundle.json"))
        if stored.get("onnx_sha256") != bundle.manifest.get("onnx_sha256"):
            raise BundleError(f"version {bundle.version} is already stored with another model; bundles never change")
        return
    store.write_bytes(f"{prefix}/model.onnx", bundle.onnx)
    store.write_bytes(f"{prefix}/bundle.json", json.dumps(bundle.manifest, indent=2).encode())


def load(store: Store, version: str) -> Bundle:
    """Read and verify one bundle; raises `BundleError` rather than returning something half-valid."""
    prefix = bundle_prefix(version)
    try:
        manifest = json.loads(store.read_bytes(f"{prefix}/bundle.json"))
        onnx = store.read_bytes(f"{prefix}/model.onnx")
    except Exception as error:  # noqa: BLE001 - missing file, bad JSON, storage error: all mean "unusable"
        raise BundleError(f"bundle {version!r} under {prefix!r} is unreadable: {error}") from error
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle {version!r} has format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    if hashlib.sha256(onnx).hexdigest() != manifest.get("onnx_sha256"):
        raise BundleError(f"bundle {version!r}: model.onnx does not match its checksum")
    return Bundle(version=str(manifest["model_version"]), onnx=onnx, manifest=manifest)


class Predictor:
    """ONNX Runtime inference over a verified bundle; checks itself on load so a broken model never serves."""

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        import onnxruntime as ort  # lazy: the code location imports this module; ONNX Runtime costs ~0.3 s to load

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # Idle ONNX threads sleep instead of spinning: spinning steals the CPU the HTTP server needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(bundle.onnx, options, providers=["CPUExecutionProvider"])
            probabilities = self.predict_proba(np.zeros((1, 1, IMAGE_SIDE, IMAGE_SIDE), np.float32))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise BundleError(f"bundle {bundle.version!r} does not load as a model: {error}") from error
        if probabilities.shape != (1, NUM_CLASSES) or not np.isfinite(probabilities).all():
            raise BundleError(f"bundle {bundle.version!r} fails its self-test (output {probabilities.shape})")
        self.bundle = bundle
        self.version = bundle.version

    def predict_proba(self, pixels: np.ndarray) -> np.ndarray:
        """`pixels`: float32 (N, 1, 28, 28) in [0, 1] -> calibrated probabilities (N, 10), `PREDICT_CHUNK`
        images per ONNX Runtime call."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if len(pixels) <= PREDICT_CHUNK:
            return self.session.run(None, {"pixels": pixels})[0]
        chunks = range(0, len(pixels), PREDICT_CHUNK)
        return np.concatenate([self.session.run(None, {"pixels": pixels[i : i + PREDICT_CHUNK]})[0] for i in chunks])
