"""JSON-lines logs in the store, written through the local journal: the one writer behind the endpoint's
prediction log and feedback log.

`record` encodes a record as one compact JSON line (`time` first, as ISO 8601 UTC) and appends it to the
journal (`storage/journal.py`) with one `os.write`, on the caller's thread: when it returns True the line is
in the kernel, and the HTTP answer may leave. The shipper (`storage/shipper.py`) moves sealed journal
segments to the store as

    <prefix>/date=YYYY-MM-DD/<UTC time sealed>-<host>-<pid>-<start>-<sequence>.jsonl

New objects rather than appends, because S3 cannot append; several replicas log to the same store without
colliding. A log built without a journal (tests and scripts that write a log directly) makes a private one
and `flush()` seals and ships it at once. `read_json_lines` reads the lines back, oldest object first.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from mnist_dagster.storage.journal import Journal, JournalSettings, default_journal_dir
from mnist_dagster.storage.shipper import Shipper
from mnist_dagster.storage.store import Store


class LogRecord(Protocol):
    """What a JSON-lines log accepts: a Unix time (which day's folder it goes to) and its line."""

    time: float

    def line(self) -> dict[str, Any]: ...


COMPACT = json.JSONEncoder(separators=(",", ":"))  # made once: `json.dumps` with options makes one per call


def json_line(fields: dict[str, Any]) -> bytes:
    """One compact JSON line: `{"time":"...` first, which the shipper reads the day from without parsing."""
    return COMPACT.encode(fields).encode() + b"\n"


class JsonLinesLog:
    """Journals records as JSON lines of the stream `prefix`; the shipper puts them under `prefix` in the store."""

    def __init__(self, store: Store, prefix: str, journal: Journal | None = None) -> None:
        self.store, self.prefix = store, prefix
        self._journal, self._private = journal, journal is None

    @property
    def journal(self) -> Journal:
        if self._journal is None:  # no server around: a private journal, shipped by `flush`
            uri = self.store.uri("")
            self._journal = Journal(JournalSettings(default_journal_dir(uri), fsync="off"), uri)
        return self._journal

    def encode(self, records: Sequence[LogRecord]) -> bytes:
        """The JSON lines of `records`; a subclass may encode a batch at once."""
        return b"".join(json_line({"time": iso_utc(record.time), **record.line()}) for record in records)

    def record(self, record: LogRecord) -> bool:
        """Journals one record; False when the journal is full (nothing written)."""
        return self.record_many([record])

    def record_many(self, records: Sequence[LogRecord]) -> bool:
        """Journals `records` with one write; False when the journal is full (nothing written)."""
        return self.journal.append(self.prefix, self.encode(records), len(records)) if records else True

    def flush(self) -> None:
        """A private journal: seal, ship to the store now and close (raises if the store refuses). A server's
        journal is shipped by its shipper; this only seals it."""
        journal = self.journal
        journal.seal(lambda segment: True)
        if not self._private:
            return
        shipper = Shipper(self.store, journal)
        if not shipper.ship_pending():
            refused = f"{self.prefix} log: the store refused the rows ({shipper.last_error})"
            raise OSError(f"{refused}; they wait in {journal.folder}")
        journal.close()
        self._journal = None


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
    return [
        json.loads(raw)
        for item in store.list(prefix)
        if item.key.endswith(".jsonl")
        for raw in store.read_bytes(item.key).splitlines()
        if raw.strip()
    ]
