"""Shadow scoring: the challenger scores what production answered, off the request path.

In shadow mode a request is answered by production as usual and its predictions journaled; its preprocessed
images and their log records are handed to `ShadowScorer.submit`, which only enqueues. One background thread
takes what is queued, scores it with the challenger in batches (it lingers up to a tenth of a second to gather
up to `max_batch` images for one ONNX call: a few times less CPU per image than one call each, so the shadow
takes little from the production path it shares the machine with), writes `shadow_digit` and `shadow_version`
into the records and hands them to `record_shadow` (the endpoint's prediction log journals them as amendment
lines of the predictions). The queue is bounded in images
(`max_images`): past it a request's images are not shadow-scored, only counted as dropped, so the request
never waits. On Linux the worker runs at a lower priority (nice +10; the challenger's
ONNX session runs on the worker's own thread): on a busy machine production gets the CPU first and the
shadow drops what it cannot keep up with, rather than the other way round.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnist_dagster.digits import IMAGE_SHAPE
from mnist_dagster.lifecycle.watcher import LoadedModel
from mnist_dagster.serving.prediction_log import PredictionRecord

logger = logging.getLogger("mnist_dagster.lifecycle")


@dataclass(frozen=True)
class _Job:
    model: LoadedModel
    pixels: np.ndarray  # float32 (N, 28, 28), the images production saw
    records: list[PredictionRecord]  # one per image, amended once scored


_STOP = object()


class ShadowScorer:
    def __init__(
        self,
        record_shadow: Callable[[list[PredictionRecord]], object],
        max_images: int = 2048,
        max_batch: int = 64,
        linger_seconds: float = 0.1,
    ) -> None:
        self.record_shadow, self.max_images, self.max_batch = record_shadow, max_images, max_batch
        self.linger_seconds = linger_seconds
        self.scored = self.dropped = self.failed = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued_images = 0
        self._lock = threading.Lock()  # guards `_queued_images` between the request path and the worker
        self._thread: threading.Thread | None = None

    def submit(self, model: LoadedModel, pixels: np.ndarray, records: list[PredictionRecord]) -> None:
        """On the request path: enqueue for the challenger, or (queue full) count them as dropped."""
        with self._lock:
            accepted = self._queued_images + len(records) <= self.max_images
            if accepted:
                self._queued_images += len(records)
            else:
                self.dropped += len(records)
        if accepted:
            self._queue.put(_Job(model, pixels.reshape(-1, *IMAGE_SHAPE), records))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow-scorer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Score and log what is queued, then stop (before the prediction log stops)."""
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def status(self) -> dict[str, int]:
        return {"queued": self._queued_images, "scored": self.scored, "dropped": self.dropped, "failed": self.failed}

    def _run(self) -> None:
        _lower_this_threads_priority()
        stopping = False
        while not stopping:
            jobs, stopping = self._next_jobs()
            if jobs:
                self._score(jobs)

    def _next_jobs(self) -> tuple[list[_Job], bool]:
        """What is queued, waiting for the first job and then up to `linger_seconds` for more, until about
        `max_batch` images: a batch of 64 costs a few times less per image than one image alone, and the
        log line can wait a tenth of a second. Also whether to stop after these."""
        item, jobs, images = self._queue.get(), [], 0
        deadline = time.monotonic() + self.linger_seconds
        while item is not _STOP:
            jobs.append(item)
            images += len(item.records)
            remaining = deadline - time.monotonic()
            if images >= self.max_batch or remaining <= 0:
                return jobs, False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return jobs, False
        return jobs, True

    def _score(self, jobs: list[_Job]) -> None:
        """One ONNX call per challenger version among `jobs` (normally one), then log every record."""
        for model in {id(job.model): job.model for job in jobs}.values():
            batch = [job for job in jobs if job.model is model]
            try:
                probabilities = model.predictor.predict_proba(np.concatenate([job.pixels for job in batch])[:, None])
                digits = probabilities.argmax(axis=1).tolist()
            except Exception:  # noqa: BLE001 - a challenger failure must not stop the shadow
                logger.exception("shadow scoring with challenger %s failed", model.version)
                digits = None
            records = [record for job in batch for record in job.records]
            if digits is not None:
                for record, digit in zip(records, digits):
                    record.shadow_digit, record.shadow_version = digit, model.version
                self.record_shadow(records)
            with self._lock:
                self._queued_images -= len(records)
                if digits is None:
                    self.failed += len(records)
                else:
                    self.scored += len(records)


SHADOW_NICENESS = 10


def _lower_this_threads_priority() -> None:
    """Nice the calling thread (Linux: a thread id is a process id to setpriority); elsewhere leave it, since
    the same call would renice the whole server."""
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICENESS)
    except OSError as error:  # not allowed in some sandboxes: the shadow then simply competes as an equal
        logger.warning("shadow scorer: cannot lower its priority (%s)", error)
