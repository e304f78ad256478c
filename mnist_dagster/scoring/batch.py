"""The nightly batch without Dagster: score what is new in the inbox, write Parquet, remember what was scored.

**Inbox format** (store prefix `inbox/`, any depth below it):
- `*.png`, `*.jpg`, `*.jpeg`: one image each, any size, preprocessed by the MNIST recipe
  (`scoring/preprocess.py`); its input id is its key.
- `*.npz`: a batch, array `images` uint8 (N, 28, 28) in MNIST format (white digit on black, like the
  landing area's labelled batches); the input id of image i is `<key>#<i>`. Other arrays are ignored.
Anything else, or a file that does not read, is rejected with its reason; a blank image inside an
`.npz` is rejected on its own and the rest of the file is scored.

**What "new since the previous run" means.** An input is a (key, content) pair. The ledger
(`predictions/ledger.json`) holds, per key, the store's object version (mtime+size locally, the ETag
on S3) and the sha256 last seen, and every (key, sha256) already scored or rejected. An unchanged
object is skipped without being read; one touched without changing its bytes is skipped after
hashing; a file whose content changed is a new input and is scored again (its rows carry the new
sha256, the old rows stay in the earlier run's table).

**Outputs** (Hive-style partitions, so `pandas.read_parquet("predictions/scored")` reads them all):
- `predictions/scored/date=YYYY-MM-DD/<run id>.parquet`: input_id, input_key, content_sha256, digit,
  confidence, runner_up, runner_up_confidence, model_version, predicted_at (UTC).
- `predictions/rejected/date=YYYY-MM-DD/<run id>.parquet`: input_id, input_key, content_sha256, reason,
  model_version, predicted_at.
The ledger is written last: a run that dies after writing its tables leaves its inputs unrecorded,
so the next run scores them again (at least once; input_id + content_sha256 identify a repeat).

**Fan-out** for a large backlog (`batch_fanout_job`): `plan_shards` finds the same new inputs and splits
them into shards balanced by bytes, `score_shard` scores one shard in its own step (tables
`<run id>-<shard>.parquet`), `commit_shards` writes the ledger once after all of them. Same ledger, same
tables, so the single-step run and the fan-out never score an input twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from mnist_dagster.layout import INBOX_LEDGER_KEY, INBOX_PREFIX, REJECTED_PREFIX, SCORED_PREFIX
from mnist_dagster.scoring.bundle import PREDICT_CHUNK, Predictor
from mnist_dagster.scoring.preprocess import MNIST_SIDE, InputError, mnist_format_many, prepare_upload
from mnist_dagster.storage import Store, StoredObject

if TYPE_CHECKING:
    import pandas as pd

LEDGER_KEY = INBOX_LEDGER_KEY
LEDGER_FORMAT = "mnist-dagster/inbox-ledger-v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BATCH_SUFFIX = ".npz"
MAX_NPZ_IMAGES_BYTES = 1 << 30  # a larger `images` array is refused: split it into several files
SCORE_CHUNK = PREDICT_CHUNK  # images per ONNX Runtime call (what `Predictor.predict_proba` does for any large array)
PREDICTION_COLUMNS = [
    "input_id", "input_key", "content_sha256", "digit", "confidence",
    "runner_up", "runner_up_confidence", "model_version", "predicted_at",
]  # fmt: skip
REJECTED_COLUMNS = ["input_id", "input_key", "content_sha256", "reason", "model_version", "predicted_at"]


@dataclass(frozen=True)
class NewInput:
    key: str
    sha256: str
    data: bytes


@dataclass
class Ledger:
    """What earlier runs saw (`seen`: key -> object version, sha256) and did (`done`: "key@sha256" -> outcome)."""

    seen: dict[str, dict[str, str]] = field(default_factory=dict)
    done: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, store: Store) -> Ledger:
        if not store.exists(LEDGER_KEY):
            return cls()
        document = json.loads(store.read_bytes(LEDGER_KEY))
        if document.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{store.uri(LEDGER_KEY)} is not a {LEDGER_FORMAT} ledger")
        return cls(seen=document["seen"], done=document["done"])

    def save(self, store: Store) -> None:
        document = {"format": LEDGER_FORMAT, "seen": self.seen, "done": self.done}
        store.write_bytes(LEDGER_KEY, json.dumps(document, indent=1, sort_keys=True).encode())


@dataclass
class BatchResult:
    predictions: pd.DataFrame  # PREDICTION_COLUMNS
    rejected: pd.DataFrame  # REJECTED_COLUMNS
    pixels: np.ndarray  # float32 (N, 1, 28, 28), row i is what predictions row i scored
    inbox_objects: int
    new_inputs: int
    seconds: float
    predictions_key: str | None = None
    rejected_key: str | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.pixels) / self.seconds if self.seconds > 0 else 0.0


def score_inbox(store: Store, predictor: Predictor, run_id: str, chunk: int = SCORE_CHUNK) -> BatchResult:
    """Score every new input in the inbox with `predictor`; write the tables, then the ledger."""
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    ledger = Ledger.load(store)
    objects = list_inbox(store)
    new_inputs = find_new_inputs(store, objects, ledger)
    result = score_inputs(store, predictor, new_inputs, ledger.done, run_id, now, chunk)
    result.inbox_objects = len(objects)
    ledger.save(store)
    result.seconds = time.perf_counter() - started
    return result


def list_inbox(store: Store) -> list[StoredObject]:
    return [item for item in store.list(INBOX_PREFIX) if not item.key.endswith("/")]


def score_inputs(
    store: Store, predictor: Predictor, new_inputs: list[NewInput], done: dict[str, dict], run_id: str,
    now: datetime, chunk: int = SCORE_CHUNK, part: str | None = None,
) -> BatchResult:
    """Score `new_inputs`, write their tables (file `<part or run_id>.parquet`), and record each outcome in
    `done` ("key@sha256" -> outcome). The ledger itself is the caller's to save, after this returns."""
    # pandas (seconds to import) only when a batch is scored: the code location imports this module
    import pandas as pd

    started = time.perf_counter()
    pixel_parts, ids, keys, shas, rejected = [], [], [], [], []
    for item in new_inputs:
        try:
            pixels, item_ids, item_rejected = read_input(item)
        except InputError as error:
            rejected.append((item.key, item.key, item.sha256, str(error)))
            done[f"{item.key}@{item.sha256}"] = _outcome("rejected", run_id, now, reason=str(error))
            continue
        rejected += [(item_ids[i], item.key, item.sha256, reason) for i, reason in sorted(item_rejected.items())]
        keep = np.setdiff1d(np.arange(len(pixels)), list(item_rejected), assume_unique=True)
        pixel_parts.append(pixels[keep] if item_rejected else pixels)
        ids += [item_ids[i] for i in keep.tolist()]
        keys += [item.key] * len(keep)
        shas += [item.sha256] * len(keep)
        done[f"{item.key}@{item.sha256}"] = _outcome("scored", run_id, now, images=len(keep), rejected=len(item_rejected))

    pixels = _stack(pixel_parts)
    probabilities = predict_in_chunks(predictor, pixels, chunk)
    ranked = np.argsort(probabilities, axis=1)
    rows = np.arange(len(probabilities))
    predictions = pd.DataFrame(
        {
            "input_id": ids,
            "input_key": keys,
            "content_sha256": shas,
            "digit": ranked[:, -1].astype(np.int64),
            "confidence": probabilities[rows, ranked[:, -1]].astype(np.float64),
            "runner_up": ranked[:, -2].astype(np.int64),
            "runner_up_confidence": probabilities[rows, ranked[:, -2]].astype(np.float64),
            "model_version": predictor.version,
            "predicted_at": pd.Timestamp(now),
        },
        columns=PREDICTION_COLUMNS,
    )
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS[:4]).assign(
        model_version=predictor.version, predicted_at=pd.Timestamp(now)
    )
    result = BatchResult(predictions, rejected_frame, pixels, 0, len(new_inputs), 0.0)
    partition = f"date={now.strftime('%Y-%m-%d')}/{part or run_id}.parquet"
    if len(predictions):
        result.predictions_key = f"{SCORED_PREFIX}/{partition}"
        store.write_bytes(result.predictions_key, predictions.to_parquet(index=False))
    if len(rejected_frame):
        result.rejected_key = f"{REJECTED_PREFIX}/{partition}"
        store.write_bytes(result.rejected_key, rejected_frame.to_parquet(index=False))
    result.seconds = time.perf_counter() - started
    return result


# ----- fan-out: plan once, score shards in parallel steps, commit the ledger once --------------------


@dataclass(frozen=True)
class InboxPlan:
    """What is new in the inbox, split for parallel scoring. Only keys, sha256s and sizes: each shard reads
    its own files. `seen` is the ledger's update for every object looked at (saved by `commit_shards`)."""

    inbox_objects: int
    shards: list[list[dict[str, str | int]]]  # per shard: {"key", "sha256", "size"}
    seen: dict[str, dict[str, str]]


def plan_shards(store: Store, shards: int) -> InboxPlan:
    """The new inputs (exactly those `score_inbox` would score), in at most `shards` groups balanced by bytes
    (largest first, each to the lightest group). Writes nothing."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    ledger = Ledger.load(store)
    before = dict(ledger.seen)
    objects = list_inbox(store)
    new_inputs = find_new_inputs(store, objects, ledger)
    groups: list[list[dict[str, str | int]]] = [[] for _ in range(min(shards, len(new_inputs)))]
    loads = [0] * len(groups)
    for item in sorted(new_inputs, key=lambda found: (-len(found.data), found.key)):
        lightest = loads.index(min(loads))
        groups[lightest].append({"key": item.key, "sha256": item.sha256, "size": len(item.data)})
        loads[lightest] += len(item.data)
    seen = {key: value for key, value in ledger.seen.items() if before.get(key) != value}
    return InboxPlan(len(objects), groups, seen)


def score_shard(
    store: Store, predictor: Predictor, shard: list[dict], run_id: str, index: int, chunk: int = SCORE_CHUNK
) -> tuple[BatchResult, dict[str, dict]]:
    """Score one shard of a plan; its tables are `<run_id>-<index>.parquet`. Returns the result and the
    ledger outcomes to commit. A file whose bytes changed since the plan is left to the next run."""
    done: dict[str, dict] = {}
    inputs = []
    for entry in shard:
        data = store.read_bytes(str(entry["key"]))
        if hashlib.sha256(data).hexdigest() == entry["sha256"]:
            inputs.append(NewInput(str(entry["key"]), str(entry["sha256"]), data))
    now = datetime.now(timezone.utc)
    result = score_inputs(store, predictor, inputs, done, run_id, now, chunk, part=f"{run_id}-{index}")
    return result, done


def commit_shards(store: Store, plan: InboxPlan, outcomes: list[dict[str, dict]]) -> Ledger:
    """Write the ledger once, after every shard wrote its tables: what they scored is never scored again,
    and a run that dies before this leaves its inputs to be scored again (at least once, as `score_inbox`)."""
    ledger = Ledger.load(store)
    ledger.seen.update(plan.seen)
    for done in outcomes:
        ledger.done.update(done)
    ledger.save(store)
    return ledger


def find_new_inputs(store: Store, objects: list[StoredObject], ledger: Ledger) -> list[NewInput]:
    """Inputs not scored or rejected before; updates `ledger.seen` for everything looked at."""
    new = []
    for item in objects:
        seen = ledger.seen.get(item.key)
        if seen is not None and seen["object_version"] == item.version:
            continue  # the same object as last time: not even read
        data = store.read_bytes(item.key)
        sha256 = hashlib.sha256(data).hexdigest()
        ledger.seen[item.key] = {"object_version": item.version, "sha256": sha256}
        if f"{item.key}@{sha256}" not in ledger.done:
            new.append(NewInput(item.key, sha256, data))
    return new


def read_input(item: NewInput) -> tuple[np.ndarray, list[str], dict[int, str]]:
    """An inbox file -> float32 (N, 1, 28, 28), an input id per image, {index: reason} for images refused."""
    name = item.key.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return prepare_upload(item.data).reshape(1, 1, MNIST_SIDE, MNIST_SIDE), [item.key], {}
    if name.endswith(BATCH_SUFFIX):
        pixels, refused = mnist_format_many(read_npz_images(item.data))
        return pixels, [f"{item.key}#{index}" for index in range(len(pixels))], refused
    raise InputError(
        f"unsupported file type: the inbox takes {', '.join(IMAGE_SUFFIXES)} images and {BATCH_SUFFIX} batches"
    )


def read_npz_images(data: bytes) -> np.ndarray:
    """The `images` array of an `.npz` batch, validated: uint8, N x 28 x 28, N >= 1."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            info = archive.getinfo("images.npy")
        if info.file_size > MAX_NPZ_IMAGES_BYTES:
            raise InputError(
                f"'images' is {info.file_size} bytes uncompressed; split batches over {MAX_NPZ_IMAGES_BYTES}"
            )
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            images = npz["images"]
    except KeyError as error:
        raise InputError("no 'images' array in the .npz (expected uint8 N x 28 x 28)") from error
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile and numpy raise many kinds for a bad file
        raise InputError(f"not a readable .npz file ({type(error).__name__}: {error})") from error
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (MNIST_SIDE, MNIST_SIDE) or len(images) == 0:
        raise InputError(f"'images' must be uint8 N x 28 x 28 with N >= 1, got {images.dtype} {images.shape}")
    return images


def predict_in_chunks(predictor: Predictor, pixels: np.ndarray, chunk: int = SCORE_CHUNK) -> np.ndarray:
    if len(pixels) == 0:
        return np.empty((0, 10), np.float32)
    return np.concatenate(
        [predictor.predict_proba(pixels[start : start + chunk]) for start in range(0, len(pixels), chunk)]
    )


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty((0, 1, MNIST_SIDE, MNIST_SIDE), np.float32)


def _outcome(outcome: str, run_id: str, now: datetime, **details) -> dict:
    return {"outcome": outcome, "run_id": run_id, "at": now.isoformat(), **details}
