"""The traffic `prediction_drift` judges, cut into windows by arm, model version and input path, and each
window's verdict against its own version's reference (no Dagster here).

A prediction-log line says which arm answered (production or challenger), with which version, and through
which input path (`input`: "json" pixels or an image "upload"; a line written before the field existed
counts as "json"). The nightly batch's Parquet rows are the "batch" path of the version that scored them,
the production arm. Each window is judged against `DriftReference.for_input(path)` of its version, and
where feedback labels came back for its predictions the realised accuracy is set beside the estimate.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd

from mnist_dagster.layout import DRIFT_CURSOR_KEY, SCORED_PREFIX, drift_reference_key
from mnist_dagster.ml import drift
from mnist_dagster.ml.cbpe import AccuracyEstimate, realised_accuracy
from mnist_dagster.serving.feedback import latest_labels, read_feedback
from mnist_dagster.serving.prediction_log import decode_images, log_objects_after, object_stamp
from mnist_dagster.storage import Store



@dataclass
class Window:
    """One arm's, one version's, one input path's traffic since the last run."""

    arm: str
    version: str
    input: str
    digits: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # base64 of the logged 28x28 images
    prediction_ids: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.arm}/v{self.version}/{self.input}"

    def __len__(self) -> int:
        return len(self.digits)


@dataclass
class Verdict:
    window: Window
    report: drift.DriftReport
    realised: AccuracyEstimate | None
    reference_source: str


def read_cursor(store: Store) -> dict[str, Any]:
    """{"log_after": the last prediction-log object judged, "batch_tables": the batch tables judged}."""
    if not store.exists(DRIFT_CURSOR_KEY):
        return {"log_after": "", "batch_tables": []}
    return json.loads(store.read_bytes(DRIFT_CURSOR_KEY))


def read_windows(store: Store, cursor: dict[str, Any], settle_seconds: float) -> tuple[list[Window], dict[str, Any]]:
    """Every window of traffic since `cursor`, largest first, and the cursor to save once they are judged."""
    settled = datetime.now(timezone.utc) - timedelta(seconds=settle_seconds)
    objects = log_objects_after(store, cursor.get("log_after", ""), settled)
    windows: dict[tuple[str, str, str], Window] = {}
    for item in objects:
        for raw in store.read_bytes(item.key).splitlines():
            if raw.strip():
                _add_line(windows, json.loads(raw))
    seen = set(cursor.get("batch_tables", []))
    tables = [item.key for item in store.list(SCORED_PREFIX) if item.key.endswith(".parquet") and item.key not in seen]
    _add_batch_rows(windows, store, tables)
    next_cursor = {
        "log_after": object_stamp(objects[-1].key) if objects else cursor.get("log_after", ""),
        "batch_tables": sorted(seen | set(tables)),
    }
    return sorted(windows.values(), key=len, reverse=True), next_cursor


def _add_line(windows: dict, line: dict) -> None:
    key = (line.get("arm", "production"), str(line["model_version"]), line.get("input") or "json")
    window = windows.setdefault(key, Window(*key))
    window.digits.append(int(line["digit"]))
    window.confidences.append(float(line["confidence"]))
    window.prediction_ids.append(line.get("prediction_id", ""))
    if "image" in line:
        window.images.append(line["image"])


def _add_batch_rows(windows: dict, store: Store, keys: list[str]) -> None:
    """The nightly batch's rows: the "batch" path of the version that scored them (the production arm)."""
    columns = ["digit", "confidence", "model_version"]
    frames = [pd.read_parquet(io.BytesIO(store.read_bytes(key)), columns=columns) for key in keys]
    if not frames:
        return
    rows = pd.concat(frames)
    for version, group in rows.groupby(rows["model_version"].astype(str)):
        window = windows.setdefault(("production", version, "batch"), Window("production", version, "batch"))
        window.digits.extend(group["digit"].astype(int).tolist())
        window.confidences.extend(group["confidence"].astype(float).tolist())


def read_reference(store: Store, version: str) -> drift.DriftReference | None:
    key = drift_reference_key(version)
    return drift.DriftReference.from_json(store.read_bytes(key)) if store.exists(key) else None


def judge(
    window: Window, reference: drift.DriftReference, thresholds: drift.DriftThresholds, labels: dict[str, int]
) -> Verdict:
    """The window against its version's reference for its input path, with its realised accuracy where
    labels exist for some of its predictions."""
    path_reference = reference.for_input(window.input)
    images = decode_images(window.images) if window.images else None
    report = drift.compare(path_reference, np.array(window.digits), np.array(window.confidences), images, thresholds)
    labelled = [(digit, labels[pid]) for digit, pid in zip(window.digits, window.prediction_ids) if pid in labels]
    realised = realised_accuracy(sum(d == label for d, label in labelled), len(labelled))
    return Verdict(window, report, realised, path_reference.source)


def feedback_labels(store: Store) -> dict[str, int]:
    """prediction_id -> the label believed (the latest sent), from the whole feedback log."""
    return latest_labels(read_feedback(store))


def accept_as_reference(store: Store, windows: list[Window], source: str) -> list[str]:
    """The operator accepts these windows as what normal looks like: each becomes its version's reference
    for its input path (the other paths' references stay). Returns what was replaced."""
    replaced = []
    for window in windows:
        reference = read_reference(store, window.version)
        kind = drift.REFERENCE_FOR_INPUT.get(window.input, "pixels")
        images = decode_images(window.images) if window.images else None
        accepted = drift.path_reference(
            images, np.array(window.digits), np.array(window.confidences),
            f"{source}: {len(window)} live predictions of {window.name}, accepted by the operator",
        )  # fmt: skip
        old = reference.paths.get(kind) if reference else None
        if not accepted.features and old is not None:  # batch rows keep no images: the image features stay
            accepted = replace(accepted, features=old.features)
        paths = {**(reference.paths if reference else {}), kind: accepted}
        if "pixels" not in paths:
            paths["pixels"] = accepted
        store.write_bytes(drift_reference_key(window.version), drift.DriftReference(paths).to_json())
        replaced.append(f"{window.version}/{kind}")
    return replaced
