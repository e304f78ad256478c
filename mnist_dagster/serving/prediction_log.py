"""What the service served, for monitoring: JSON lines in the store, written off the request path.

A request only appends a tuple to a queue, which costs next to nothing. A background thread drains the queue
every `flush_seconds` and writes one new object per flush and day:
`prediction_log/date=YYYY-MM-DD/<UTC time>-<host>-<pid>-<sequence>.jsonl`, one line per prediction:
`{"time": ISO-8601 UTC, "model_version", "digit", "confidence", "endpoint"}`. New objects rather than
appends, because S3 cannot append; several replicas can log to the same store without colliding.
If the store is unreachable the records wait in memory (up to `max_pending`, then the oldest are
dropped and the count is logged) and are written on a later flush.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import socket
import threading
from collections import defaultdict
from datetime import datetime, timezone

from mnist_dagster.layout import PREDICTION_LOG_PREFIX
from mnist_dagster.storage import Store

logger = logging.getLogger("mnist_dagster.serving")

Record = tuple[float, str, int, float, str]  # unix time, model version, digit, confidence, endpoint


class PredictionLog:
    def __init__(
        self,
        store: Store,
        prefix: str = PREDICTION_LOG_PREFIX,
        flush_seconds: float = 5.0,
        max_pending: int = 1_000_000,
    ) -> None:
        self.store, self.prefix, self.flush_seconds, self.max_pending = store, prefix, flush_seconds, max_pending
        self._queue: queue.SimpleQueue[Record] = queue.SimpleQueue()
        self._pending: list[Record] = []
        self._writer_id = f"{re.sub(r'[^A-Za-z0-9.-]', '-', socket.gethostname())}-{os.getpid()}"
        self._sequence = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, time: float, model_version: str, digit: int, confidence: float, endpoint: str) -> None:
        """Called on the request path: enqueue only."""
        self._queue.put((time, model_version, digit, confidence, endpoint))

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def flush(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not self._pending:
            return
        if len(self._pending) > self.max_pending:
            dropped = len(self._pending) - self.max_pending
            del self._pending[:dropped]
            logger.error("prediction log: dropped the %d oldest records (store unreachable for too long)", dropped)
        by_day: dict[str, list[Record]] = defaultdict(list)
        for record in self._pending:
            by_day[_day(record)].append(record)
        written: set[str] = set()
        for day, records in by_day.items():
            try:
                self.store.write_bytes(self._next_key(day), _json_lines(records))
                written.add(day)
            except Exception as error:  # noqa: BLE001 - keep the records and try again on the next flush
                logger.error(
                    "prediction log: cannot write %d records for %s (%s); will retry", len(records), day, error
                )
        self._pending = [record for record in self._pending if _day(record) not in written]

    def _next_key(self, day: str) -> str:
        self._sequence += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return f"{self.prefix}/date={day}/{stamp}-{self._writer_id}-{self._sequence:06d}.jsonl"


def _day(record: Record) -> str:
    return datetime.fromtimestamp(record[0], timezone.utc).strftime("%Y-%m-%d")


def _json_lines(records: list[Record]) -> bytes:
    lines = (
        json.dumps(
            {
                "time": datetime.fromtimestamp(time, timezone.utc).isoformat(),
                "model_version": version,
                "digit": digit,
                "confidence": confidence,
                "endpoint": endpoint,
            }
        )
        for time, version, digit, confidence, endpoint in records
    )
    return ("\n".join(lines) + "\n").encode()


def read_prediction_log(store: Store, prefix: str = PREDICTION_LOG_PREFIX) -> list[dict]:
    """Every logged prediction, oldest object first: what a monitoring job reads."""
    records = []
    for item in store.list(prefix):
        if item.key.endswith(".jsonl"):
            records.extend(json.loads(line) for line in store.read_bytes(item.key).splitlines() if line.strip())
    return records
