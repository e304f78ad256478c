"""The shipper: sealed journal segments become objects in the store, where the readers have always looked.

A sealed segment `<stream>+<sequence>+<sealed stamp>.sealed` of the journal folder `<host>-<pid>-<start>`
becomes one object per day of its rows:

    <stream>/date=YYYY-MM-DD/<sealed stamp>-<host>-<pid>-<start>-<sequence>.jsonl

(`prediction_log/...`, `feedback/...`): the same JSON lines, in the same folders, the UTC stamp first so that
names sort by time (a reader's cursor, see serving's `prediction_log.object_stamp`). The name is a function
of the segment alone, so an upload that is retried (the store failed, or the process died between the upload
and the delete) overwrites the same object with the same bytes: no row is ever stored twice. A segment is
deleted only after every one of its objects was written.

On start the shipper adopts what earlier processes on this journal directory left (folders whose lock no
living process holds, for the same store): their open segments are sealed (a torn last line, which only power
loss can leave, is cut) and shipped, and the folder removed. While the store is unreachable the segments wait
on disk (bounded by the journal's `max_bytes`) and the shipper retries with a growing pause (up to
`max_backoff`); memory holds at most one segment at a time. On graceful shutdown it seals and ships
everything, trying for up to `shutdown_seconds`; what the store still refuses then stays for the next start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from mnist_dagster.storage.journal import (
    LOCK_FILE,
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    STORE_FILE,
    Journal,
    parse_segment_name,
    seal_path,
)
from mnist_dagster.storage.store import Store

logger = logging.getLogger("mnist_dagster.storage")

TIME_PREFIX = b'{"time":"'  # every journal line starts so (compact JSON, `time` first): the day is bytes 9-19


def object_keys(path: Path, folder_name: str, days: list[str]) -> dict[str, str]:
    """day -> the store key of that day's rows of the sealed segment `path` (a pure function of its name)."""
    stream, sequence, stamp = parse_segment_name(path)
    return {day: f"{unquote(stream)}/date={day}/{stamp}-{folder_name}-{sequence}.jsonl" for day in days}


def day_of(line: bytes) -> str:
    if line.startswith(TIME_PREFIX):
        return line[9:19].decode("ascii")
    return str(json.loads(line)["time"])[:10]


def ship_segment(store: Store, path: Path, folder_name: str) -> int:
    """Writes the rows of one sealed segment to the store, one object per day; returns how many rows."""
    by_day: dict[str, list[bytes]] = defaultdict(list)
    for line in path.read_bytes().split(b"\n"):
        if line.strip():
            by_day[day_of(line)].append(line)
    for day, key in object_keys(path, folder_name, sorted(by_day)).items():
        store.write_bytes(key, b"\n".join(by_day[day]) + b"\n")
    return sum(len(lines) for lines in by_day.values())


def cut_torn_tail(path: Path) -> None:
    """Drops a last line without its newline (half-written when the power went)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)
        logger.warning("journal: cut a torn last line from %s", path)


class Shipper:
    """Moves the journal's sealed segments (and those of dead processes) to the store, in its own thread."""

    def __init__(
        self,
        store: Store,
        journal: Journal,
        poll_seconds: float = 1.0,
        max_backoff: float = 10.0,
        shutdown_seconds: float = 10.0,
        rescan_seconds: float = 30.0,
    ) -> None:
        self.store, self.journal = store, journal
        self.poll_seconds, self.max_backoff = poll_seconds, max_backoff
        self.shutdown_seconds, self.rescan_seconds = shutdown_seconds, rescan_seconds
        self.shipped_rows = self.shipped_segments = self.adopted_segments = 0
        self.last_error: str | None = None
        self._adopted: dict[Path, int] = {}  # a dead process's folder -> the lock we hold on it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.journal.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Seals everything and ships it (for up to `shutdown_seconds`); what is left waits on disk."""
        self._stop.set()
        self.journal.sealed_event.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.journal.stop()
        deadline, pause = time.monotonic() + self.shutdown_seconds, 0.2
        while not self.ship_pending() and time.monotonic() < deadline:
            time.sleep(pause)  # the store is failing: a short pause before the next try, within the deadline
            pause = min(pause * 2, 2.0)
        if self.waiting():
            logger.error("shipper: %d segment(s) left in %s for the next start", self.waiting(), self.journal.folder)
        for folder in list(self._adopted):
            self._finish_adopted(folder)
        self.journal.close()

    def _run(self) -> None:
        self.adopt_leftovers()
        last_scan, pause = time.monotonic(), self.poll_seconds
        while not self._stop.is_set():
            if pause > self.poll_seconds:
                self._stop.wait(pause)  # backing off from a failing store
            else:
                self.journal.sealed_event.wait(pause)
            self.journal.sealed_event.clear()
            if self._stop.is_set():
                return
            if time.monotonic() - last_scan >= self.rescan_seconds:
                self.adopt_leftovers()
                last_scan = time.monotonic()
            pause = self.poll_seconds if self.ship_pending() else min(max(pause, 0.25) * 2, self.max_backoff)

    def ship_pending(self) -> bool:
        """Ships every sealed segment, adopted ones first (they are older); False when the store failed."""
        try:
            for folder in list(self._adopted):
                self._ship_folder(folder)
                self._finish_adopted(folder)
            self._ship_folder(self.journal.folder)
        except Exception as error:  # noqa: BLE001 - any store failure: keep the segments, try again later
            if str(error) != self.last_error:
                logger.error("shipper: the store refused a segment (%s); keeping it on disk, will retry", error)
            self.last_error = str(error)
            return False
        self.last_error = None
        return True

    def _ship_folder(self, folder: Path) -> None:
        for path in sorted(folder.glob(f"*{SEALED_SUFFIX}")):
            size = path.stat().st_size
            self.shipped_rows += ship_segment(self.store, path, folder.name)
            self.journal.release(path, size)
            self.shipped_segments += 1

    def waiting(self) -> int:
        """Sealed segments not yet in the store (this process's and adopted ones)."""
        return sum(len(list(folder.glob(f"*{SEALED_SUFFIX}"))) for folder in [*self._adopted, self.journal.folder])

    def adopt_leftovers(self) -> None:
        """Takes over the folders of dead processes on the same store: their segments are shipped next."""
        try:
            folders = [path for path in self.journal.settings.directory.iterdir() if path.is_dir()]
        except FileNotFoundError:
            return
        for folder in folders:
            if folder != self.journal.folder and folder not in self._adopted:
                self._adopt(folder)

    def _adopt(self, folder: Path) -> None:
        try:
            if (folder / STORE_FILE).read_text() != self.journal.store_uri:
                return  # another store's rows: not ours to ship
            lock = os.open(folder / LOCK_FILE, os.O_RDWR)
        except FileNotFoundError:
            return  # being removed by whoever shipped it
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)  # a living process: its own shipper ships it
            return
        for open_path in folder.glob(f"*{OPEN_SUFFIX}"):
            cut_torn_tail(open_path)
            if open_path.stat().st_size:
                seal_path(open_path)
            else:
                open_path.unlink()
        segments = list(folder.glob(f"*{SEALED_SUFFIX}"))
        self.journal.hold(sum(path.stat().st_size for path in segments))
        self.adopted_segments += len(segments)
        self._adopted[folder] = lock
        logger.info("shipper: adopted %d segment(s) left by %s", len(segments), folder.name)

    def _finish_adopted(self, folder: Path) -> None:
        """Removes an adopted folder once it is empty, and lets go of its lock."""
        if not any(folder.glob(f"*{SEALED_SUFFIX}")):
            for name in (STORE_FILE, LOCK_FILE):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
        os.close(self._adopted.pop(folder))

    def status(self) -> dict[str, Any]:
        """The journal and shipping, for a health check; `refused`: rows not journaled (it was full), per stream."""
        journal = self.journal.status()
        return {
            "fsync": journal.fsync,
            "held_bytes": journal.held_bytes,
            "max_bytes": journal.max_bytes,
            "full": journal.full,
            "waiting_segments": self.waiting(),
            "shipped_rows": self.shipped_rows,
            "adopted_segments": self.adopted_segments,
            "refused": journal.refused,
            "store_error": self.last_error,
        }
