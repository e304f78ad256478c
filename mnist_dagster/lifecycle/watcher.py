"""A serving process follows the deployment record: which versions to load, and how to split traffic.

`DeploymentWatcher` polls `deployment.json` (`record.py`) off the request path. When the
record names a version that is not loaded, its immutable bundle is read, verified and self-tested in the
poll thread, then the whole `Deployment` (production, challenger, routing, trial) is swapped in with one
assignment, so a request sees the old state or the new one, never a mix. A bundle that fails to load is
refused (logged, shown by `/health`), the state in force keeps serving, and it is retried every
`retry_seconds` in case the failure was the store's. An unreadable record keeps the state in force too.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from mnist_dagster.lifecycle.record import DeploymentRecord, Routing, read_record
from mnist_dagster.scoring.bundle import BundleError, Predictor, load
from mnist_dagster.storage import Store

logger = logging.getLogger("mnist_dagster.lifecycle")


@dataclass(frozen=True)
class LoadedModel:
    predictor: Predictor
    loaded_at: str

    @property
    def version(self) -> str:
        return self.predictor.version


@dataclass(frozen=True)
class Deployment:
    """What the endpoint serves right now: replaced as a whole whenever the record or a load changes it."""

    production: LoadedModel | None = None
    challenger: LoadedModel | None = None  # None also while the record's challenger is refused or not loaded
    routing: Routing = field(default_factory=Routing)
    trial_id: str | None = None


class DeploymentWatcher:
    """Keeps `current` (a `Deployment`) in step with the record, from a daemon thread that calls `refresh()`
    every `poll_seconds` (and once, synchronously, on `start`), so every store read stays off the request
    path. `challenger_threads`: ONNX Runtime threads for the challenger (1: its shadow batches never take
    more than one core from production)."""

    def __init__(
        self, store: Store, poll_seconds: float = 1.0, retry_seconds: float = 30.0, challenger_threads: int = 1
    ) -> None:
        self.store, self.poll_seconds = store, poll_seconds
        self.retry_seconds, self.challenger_threads = retry_seconds, challenger_threads
        self.current = Deployment()
        self.record = DeploymentRecord()
        self.refused: dict[str, tuple[str, float]] = {}  # version -> (reason, monotonic time refused)
        self.note: str | None = None  # why the record in force is not the stored one (unreadable, missing)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.refresh()
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="deployment-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher outlives any single failure
                logger.exception("deployment watcher: unexpected error; will try again")

    def refresh(self) -> None:
        record = self._read_record()
        if record is None:
            return
        production = self._model(record.production, self.current.production, threads=0)
        challenger = self._model(record.challenger, self.current.challenger, threads=self.challenger_threads)
        routing = record.routing if challenger is not None else Routing()
        state = Deployment(production, challenger, routing, record.trial_id)
        if state != self.current:
            logger.info(
                "Serving production %s, challenger %s, routing %s",
                production.version if production else None,
                challenger.version if challenger else None,
                routing.as_dict(),
            )
            self.current = state
        self.record = record

    def _read_record(self) -> DeploymentRecord | None:
        try:
            record = read_record(self.store)
        except Exception as error:  # noqa: BLE001 - a store outage or a bad record must not stop serving
            note = f"cannot read the deployment record ({type(error).__name__}: {error}); serving what is loaded"
            if note != self.note:
                logger.error("%s", note)
            self.note = note
            return None
        self.note = None if record.production else "no deployment record yet: nothing to serve"
        return record

    def _model(self, version: str | None, loaded: LoadedModel | None, threads: int) -> LoadedModel | None:
        """The loaded model for `version`: the one in force if it is that version, else a fresh load
        (None when the record names none, or the bundle is refused and nothing of that role was loaded)."""
        if version is None:
            return None
        if loaded is not None and loaded.version == version:
            return loaded
        refused = self.refused.get(version)
        if refused is not None and time.monotonic() - refused[1] < self.retry_seconds:
            return loaded
        try:
            predictor = Predictor(load(self.store, version), threads)
        except BundleError as error:
            self.refused[version] = (str(error), time.monotonic())
            logger.error(
                "Refused model version %s (still serving %s): %s",
                version,
                loaded.version if loaded else "nothing",
                error,
            )
            return loaded
        self.refused.pop(version, None)
        return LoadedModel(predictor, datetime.now(timezone.utc).isoformat())

    def status(self) -> dict[str, Any]:
        """What `/health` says about the models and the routing in force."""
        state, record = self.current, self.record
        refused = {version: reason for version, (reason, _) in self.refused.items()}
        return {
            "model_version": state.production.version if state.production else None,
            "loaded_at": state.production.loaded_at if state.production else None,
            "refused": {v: r for v, r in refused.items() if v == record.production},
            "challenger_version": state.challenger.version if state.challenger else None,
            "challenger_loaded_at": state.challenger.loaded_at if state.challenger else None,
            "challenger_refused": {v: r for v, r in refused.items() if v == record.challenger},
            "routing": state.routing.as_dict(),
            "routing_note": self.note,
            "trial_id": state.trial_id,
        }
