"""JSON-lines logs in the store, written off the request path: the one writer behind the prediction log and
the feedback log.

A request only appends a record to a queue, which costs next to nothing. A background thread turns what
is queued into JSON lines every `encode_seconds` (a quarter of a second: small steady batches, rather than
one burst per flush that would hold the GIL long enough to show in the request path's p99; and what
waits in memory is the compact line, not the request's arrays), and every `flush_seconds` writes one new
object per day: `<prefix>/date=YYYY-MM-DD/<UTC time>-<host>-<pid>-<sequence>.jsonl`. New objects rather than appends,
because S3 cannot append; several replicas can log to the same store without colliding. If the store is
unreachable the lines wait in memory (up to `max_pending`, then the oldest are dropped and the count is
logged) and are written on a later flush. `stop()` writes whatever is queued.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Protocol

from mnist_dagster.storage import Store

logger = logging.getLogger("mnist_dagster.serving")


class LogRecord(Protocol):
    """What a JSON-lines log accepts: a Unix time (which day's folder it goes to) and its line."""

    time: float

    def line(self) -> dict[str, Any]: ...


class JsonLinesLog:
    """Queues records on the request path; a background thread writes them as JSON lines under `prefix`."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        flush_seconds: float = 5.0,
        max_pending: int = 1_000_000,
        encode_seconds: float = 0.25,
    ) -> None:
        self.store, self.prefix, self.flush_seconds, self.max_pending = store, prefix, flush_seconds, max_pending
        self.encode_seconds = min(encode_seconds, flush_seconds)
        self._queue: queue.SimpleQueue[LogRecord] = queue.SimpleQueue()
        self._pending: list[tuple[str, str]] = []  # (day, JSON line), oldest first
        self._writer_id = f"{re.sub(r'[^A-Za-z0-9.-]', '-', socket.gethostname())}-{os.getpid()}"
        self._sequence = 0
        self._lock = threading.Lock()  # the background thread and `stop`'s last flush never interleave
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, record: LogRecord) -> None:
        """Called on the request path: enqueue only."""
        self._queue.put(record)

    def encode(self, records: list[LogRecord]) -> list[str]:
        """The JSON lines of `records`, `time` first as ISO 8601 UTC; a subclass may encode a batch at once."""
        return [json.dumps({"time": iso_utc(record.time), **record.line()}) for record in records]

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"log-{self.prefix}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        last_write = time.monotonic()
        while not self._stop.wait(self.encode_seconds):
            with self._lock:
                self._drain()
            if time.monotonic() - last_write >= self.flush_seconds:
                self.flush()
                last_write = time.monotonic()

    def flush(self) -> None:
        """Write every queued record now (one object per day); keep what the store refuses for next time."""
        with self._lock:
            self._drain()
            if not self._pending:
                return
            if len(self._pending) > self.max_pending:
                dropped = len(self._pending) - self.max_pending
                del self._pending[:dropped]
                logger.error(
                    "%s log: dropped the %d oldest records (store unreachable for too long)", self.prefix, dropped
                )
            by_day: dict[str, list[str]] = defaultdict(list)
            for day, line in self._pending:
                by_day[day].append(line)
            written = {day for day, lines in by_day.items() if self._write(day, lines)}
            self._pending = [(day, line) for day, line in self._pending if day not in written]

    def _drain(self, chunk: int = 512) -> None:
        """Encode what is queued, `chunk` records at a time (one numpy pass each, where a subclass can)."""
        while True:
            records = []
            try:
                while len(records) < chunk:
                    records.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if not records:
                return
            days = (_second(int(record.time))[:10] for record in records)
            self._pending.extend(zip(days, self.encode(records)))

    def _write(self, day: str, lines: list[str]) -> bool:
        try:
            self.store.write_bytes(self._next_key(day), ("\n".join(lines) + "\n").encode())
            return True
        except Exception as error:  # noqa: BLE001 - keep the lines and try again on the next flush
            logger.error("%s log: cannot write %d records for %s (%s); will retry", self.prefix, len(lines), day, error)
            return False

    def _next_key(self, day: str) -> str:
        self._sequence += 1
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return f"{self.prefix}/date={day}/{stamp}-{self._writer_id}-{self._sequence:06d}.jsonl"


@functools.lru_cache(maxsize=8)
def _second(whole_seconds: int) -> str:
    return datetime.fromtimestamp(whole_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def iso_utc(unix_time: float) -> str:
    """`2024-05-01T12:00:00.123456+00:00`: ISO 8601 UTC with microseconds, the date part formatted once per
    second (a fifth of `datetime.isoformat`'s cost, which counts at thousands of lines a second)."""
    whole = int(unix_time)
    return f"{_second(whole)}.{int((unix_time - whole) * 1_000_000):06d}+00:00"


def read_json_lines(store: Store, prefix: str) -> list[dict]:
    """Every line logged under `prefix`, oldest object first (keys sort by day, then time written)."""
    records = []
    for item in store.list(prefix):
        if item.key.endswith(".jsonl"):
            records.extend(json.loads(line) for line in store.read_bytes(item.key).splitlines() if line.strip())
    return records
