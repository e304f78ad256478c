"""The traffic `prediction_drift` judges, cut into windows by arm, model version and input path, and each
window's verdict against its own version's reference (no Dagster here).

A prediction-log line says which arm answered (production or challenger), with which version, and through
which input path (`input`: "json" pixels or an image "upload"; a line written before the field existed
counts as "json"). The nightly batch's Parquet rows are the "batch" path of the version that scored them,
the production arm. Each window is judged against `DriftReference.for_input(path)` of its version, and
where feedback labels came back for its predictions the realised accuracy is set beside the estimate.

Every prediction is judged once, in one window, so the daily verdicts are tests on disjoint samples and each
keeps its level however many days run (no re-testing of the same traffic as it accumulates). A window with
too little traffic is not judged and not consumed: it waits in the cursor (`waiting`: where its unjudged
lines begin, which batch tables hold its rows) and is judged once it has enough, even while other windows
move the cursor on; a challenger at a tenth of the traffic would otherwise never be judged. A window that
waited `max_wait_days` is let go (a retired version's last few predictions) and the verdict says so.
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
from mnist_dagster.serving.prediction_log import AMENDS, decode_images, log_objects_after, object_stamp
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
    since: str = ""  # the log cursor its unjudged lines come after
    tables: list[str] = field(default_factory=list)  # the batch tables its rows came from
    waiting_since: str = ""  # when a run first left it waiting for traffic (ISO UTC); "" if it never waited

    @property
    def name(self) -> str:
        return _window_key(self.arm, self.version, self.input)

    def __len__(self) -> int:
        return len(self.digits)


@dataclass
class Verdict:
    window: Window
    report: drift.DriftReport
    realised: AccuracyEstimate | None
    reference_source: str


def read_cursor(store: Store) -> dict[str, Any]:
    """{"log_after": the last prediction-log object read, "batch_tables": the batch tables read, "waiting":
    {window name: {"since", "tables", "waiting_since"}} for the windows read but not judged yet}."""
    if not store.exists(DRIFT_CURSOR_KEY):
        return {"log_after": "", "batch_tables": [], "waiting": {}}
    return json.loads(store.read_bytes(DRIFT_CURSOR_KEY))


def read_windows(store: Store, cursor: dict[str, Any], settle_seconds: float) -> tuple[list[Window], dict[str, Any]]:
    """Every window of traffic not judged yet (since `cursor`, and the waiting windows' older traffic), largest
    first, and where this read ended (`next_cursor` makes the cursor to save from it once they are judged)."""
    settled = datetime.now(timezone.utc) - timedelta(seconds=settle_seconds)
    log_after, waiting = cursor.get("log_after", ""), cursor.get("waiting", {})
    waiting_log = [w["since"] for name, w in waiting.items() if not name.endswith("/batch")]  # batch: tables
    objects = log_objects_after(store, min([log_after, *waiting_log]), settled)
    windows: dict[tuple[str, str, str], Window] = {}
    for item in objects:
        stamp = object_stamp(item.key)
        for raw in store.read_bytes(item.key).splitlines():
            if raw.strip():
                _add_line(windows, json.loads(raw), stamp, log_after, waiting)
    seen = set(cursor.get("batch_tables", []))
    tables = [item.key for item in store.list(SCORED_PREFIX) if item.key.endswith(".parquet") and item.key not in seen]
    _add_batch_rows(windows, store, tables, waiting)
    read_to = {
        "log_after": object_stamp(objects[-1].key) if objects else log_after,
        "batch_tables": sorted(seen | set(tables)),
    }
    return sorted(windows.values(), key=len, reverse=True), read_to


def next_cursor(read_to: dict[str, Any], waiting: list[Window], now: datetime) -> dict[str, Any]:
    """The cursor after a run that judged every window it read but `waiting` (kept for a later run)."""
    stamp = now.astimezone(timezone.utc).isoformat(timespec="seconds")
    return {**read_to, "waiting": {
        w.name: {"since": w.since, "tables": w.tables, "waiting_since": w.waiting_since or stamp} for w in waiting
    }}  # fmt: skip


def waited_too_long(window: Window, now: datetime, max_wait_days: float) -> bool:
    """A window left waiting for traffic longer than `max_wait_days` (a retired version's last predictions)."""
    if not window.waiting_since:
        return False
    return now - datetime.fromisoformat(window.waiting_since) > timedelta(days=max_wait_days)


def _window_key(arm: str, version: str, input_path: str) -> str:
    return f"{arm}/v{version}/{input_path}"


def _window(windows: dict, key: tuple[str, str, str], since: str, waiting: dict) -> Window:
    """The window of `key`, made on first use with where its unjudged traffic begins."""
    if key not in windows:
        earlier = waiting.get(_window_key(*key), {})
        windows[key] = Window(*key, since=earlier.get("since", since),
                              waiting_since=earlier.get("waiting_since", ""))  # fmt: skip
    return windows[key]


def _add_line(windows: dict, line: dict, stamp: str, log_after: str, waiting: dict) -> None:
    """One log line, if it has not been judged: written after the cursor, or its window is waiting since before.
    A shadow amendment (the challenger's digit for an answer already logged, no confidence, no image) is not
    an answer anyone was served: skipped."""
    if AMENDS in line:
        return
    key = (line.get("arm", "production"), str(line["model_version"]), line.get("input") or "json")
    earlier = waiting.get(_window_key(*key))
    if stamp <= log_after and (earlier is None or stamp <= earlier["since"]):
        return  # judged by an earlier run
    window = _window(windows, key, log_after, waiting)
    window.digits.append(int(line["digit"]))
    window.confidences.append(float(line["confidence"]))
    window.prediction_ids.append(line.get("prediction_id", ""))
    if "image" in line:
        window.images.append(line["image"])


def _add_batch_rows(windows: dict, store: Store, new_tables: list[str], waiting: dict) -> None:
    """The nightly batch's rows: the "batch" path of the version that scored them (the production arm). A
    waiting batch window's rows are read again from its own tables, that version's rows only."""
    columns = ["digit", "confidence", "model_version"]
    reads = [(key, None) for key in new_tables]
    for name, earlier in waiting.items():
        if name.startswith("production/v") and name.endswith("/batch"):
            reads += [(key, name[len("production/v") : -len("/batch")]) for key in earlier.get("tables", [])]
    for key, only_version in reads:
        if not store.exists(key):
            continue  # a table removed since (retention): its rows are gone
        rows = pd.read_parquet(io.BytesIO(store.read_bytes(key)), columns=columns)
        for version, group in rows.groupby(rows["model_version"].astype(str)):
            if only_version is not None and version != only_version:
                continue
            window = _window(windows, ("production", version, "batch"), "", waiting)
            window.digits.extend(group["digit"].astype(int).tolist())
            window.confidences.extend(group["confidence"].astype(float).tolist())
            window.tables.append(key)


def read_reference(store: Store, version: str) -> drift.DriftReference | None:
    """`version`'s drift reference; None when none was saved, or when it was saved in an older format (a
    model deployed before `drift.FORMAT` changed): that version is then not judged, and says so, until it
    is deployed again or a window of its traffic is accepted as its reference (`accept_reference`)."""
    key = drift_reference_key(version)
    if not store.exists(key):
        return None
    try:
        return drift.DriftReference.from_json(store.read_bytes(key))
    except ValueError:  # another format's reference: as good as none for this code
        return None


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
