"""The local append-only journal: what a process acknowledged is on local disk before the answer leaves.

A caller appends whole JSON lines with one `os.write` to the open segment of a stream (a stream per store
prefix; the endpoint's are `prediction_log` and `feedback`) before it answers. Once `write()` returned, the
bytes are in the kernel: a crash of the process (SIGKILL, OOM kill) loses nothing acknowledged. What power
loss may lose depends on `MNIST_JOURNAL_FSYNC`:

    always    fsync after every append, on the request path: nothing acknowledged is lost, at a disk flush
              per request
    interval  (default) a background thread fsyncs every `fsync_interval` (200 ms): at most that much
    off       the kernel writes back when it likes (Linux: about 30 s): at most that much

Layout: one folder per process, so replicas and restarts never share a file,

    $MNIST_JOURNAL_DIR/<host>-<pid>-<start UTC stamp>/
        LOCK                                   flock-ed while the process lives
        STORE                                  the store these rows belong to
        <stream>+<sequence>.open               being appended to
        <stream>+<sequence>+<sealed UTC stamp>.sealed   closed, fsynced, waiting for the shipper

A segment is sealed (fsync, close, rename, fsync of the folder) when it reaches `segment_bytes` or is
`segment_seconds` old; the shipper (`storage/shipper.py`) moves sealed segments to the store and deletes
them. The bytes held on disk (this process's segments and any adopted from a dead one) are bounded by
`max_bytes`: past it `append` refuses and the caller decides (the endpoint's feedback route answers 503, a
prediction is still answered and counted as dropped).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

logger = logging.getLogger("mnist_dagster.storage")

FSYNC_MODES = ("always", "interval", "off")
STAMP_FORMAT = "%Y%m%dT%H%M%S%fZ"  # 22 characters, sorting by time: the store objects' names start with it
LOCK_FILE, STORE_FILE = "LOCK", "STORE"
OPEN_SUFFIX, SEALED_SUFFIX = ".open", ".sealed"


def utc_stamp(unix_time: float | None = None) -> str:
    moment = datetime.now(timezone.utc) if unix_time is None else datetime.fromtimestamp(unix_time, timezone.utc)
    return moment.strftime(STAMP_FORMAT)


def default_journal_dir(store_uri: str) -> Path:
    """A folder of the temp dir named after the store, so journals of different stores never mix."""
    digest = hashlib.sha256(store_uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "mnist-dagster-journal" / digest


@dataclass(frozen=True)
class JournalSettings:
    directory: Path
    fsync: str = "interval"
    fsync_interval: float = 0.2
    segment_bytes: int = 4 * 1024 * 1024
    segment_seconds: float = 5.0
    max_bytes: int = 2 * 1024**3

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_MODES:
            raise ValueError(f"MNIST_JOURNAL_FSYNC={self.fsync!r} is not one of {', '.join(FSYNC_MODES)}")

    @classmethod
    def from_env(cls, store_uri: str, env: Mapping[str, str] = os.environ, **overrides: object) -> JournalSettings:
        """`MNIST_JOURNAL_DIR` (default: `default_journal_dir`), `MNIST_JOURNAL_FSYNC` (default interval),
        `MNIST_JOURNAL_MAX_BYTES`; `overrides` (the CLI's options) win."""
        values: dict[str, object] = {
            "directory": Path(env.get("MNIST_JOURNAL_DIR") or default_journal_dir(store_uri)),
            "fsync": env.get("MNIST_JOURNAL_FSYNC", "interval").strip().lower() or "interval",
        }
        if env.get("MNIST_JOURNAL_MAX_BYTES"):
            values["max_bytes"] = int(env["MNIST_JOURNAL_MAX_BYTES"])
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class _OpenSegment:
    path: Path
    fd: int
    sequence: int
    opened: float
    size: int = 0


@dataclass
class JournalStatus:
    """What `/health` shows of the journal."""

    fsync: str
    held_bytes: int
    max_bytes: int
    full: bool
    refused: dict[str, int] = field(default_factory=dict)  # rows not journaled (over max_bytes), per stream


def new_process_folder(directory: Path) -> Path:
    """`<directory>/<host>-<pid>-<UTC stamp>`, made now: no other process, nor an earlier one with the same
    pid, has this name (a second journal of this process in the same microsecond takes the next one)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        folder = directory / f"{host}-{os.getpid()}-{utc_stamp()}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def stream_file_name(stream: str) -> str:
    """A store prefix as a file-name part: `+` separates the parts, so it is escaped (as `/` is)."""
    return quote(stream, safe="")


def fsync_folder(folder: Path) -> None:
    """Makes a rename or unlink in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """This process's journal folder: `append` on the request path, `tick` from its own thread."""

    def __init__(self, settings: JournalSettings, store_uri: str) -> None:
        self.settings, self.store_uri = settings, store_uri
        self.folder = new_process_folder(settings.directory)
        self.name = self.folder.name
        (self.folder / STORE_FILE).write_text(store_uri)
        self._lock_fd = os.open(self.folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when we die
        self._lock = threading.Lock()  # the request path and the tick thread
        self._open: dict[str, _OpenSegment] = {}
        self._sequence = 0
        self._dirty: set[int] = set()
        self.held_bytes = 0  # on disk and not yet shipped: this process's and adopted segments
        self.refused: Counter[str] = Counter()
        self._refusing = False  # an append did not fit, and no shipped segment has made room since
        self.sealed_event = threading.Event()  # set when a segment is sealed: the shipper wakes up
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- the request path ------------------------------------------------------------------------

    def append(self, stream: str, data: bytes, rows: int = 1) -> bool:
        """Appends `data` (whole JSON lines) to `stream`; False, writing nothing, when the journal is full."""
        with self._lock:
            if self._refusing or self.held_bytes + len(data) > self.settings.max_bytes:  # full until room is made
                self.refused[stream] += rows
                self._refusing = True
                return False
            segment = self._open.get(stream) or self._new_segment(stream)
            view = memoryview(data)
            while view:  # a regular file takes it all at once; the loop is for the letter of write(2)
                view = view[os.write(segment.fd, view) :]
            segment.size += len(data)
            self.held_bytes += len(data)
            if self.settings.fsync == "always":
                os.fsync(segment.fd)
            else:
                self._dirty.add(segment.fd)
        return True

    def full(self) -> bool:
        """Whether appends are being refused: the budget is spent, or the last append did not fit."""
        return self._refusing or self.held_bytes >= self.settings.max_bytes

    def status(self) -> JournalStatus:
        settings = self.settings
        return JournalStatus(settings.fsync, self.held_bytes, settings.max_bytes, self.full(), dict(self.refused))

    def _new_segment(self, stream: str) -> _OpenSegment:
        self._sequence += 1
        path = self.folder / f"{stream_file_name(stream)}+{self._sequence:06d}{OPEN_SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        segment = _OpenSegment(path, fd, self._sequence, time.monotonic())
        self._open[stream] = segment
        return segment

    # ----- the background: fsync, rotation ---------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread and seals every open segment (graceful shutdown: the shipper then ships them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.seal(lambda segment: True)

    def close(self) -> None:
        """Releases the folder's lock; an empty folder is removed (a later process adopts a non-empty one)."""
        self.seal(lambda segment: True)
        if not any(self.folder.glob(f"*{SEALED_SUFFIX}")):
            for name in (STORE_FILE, LOCK_FILE):
                (self.folder / name).unlink(missing_ok=True)
            self.folder.rmdir()
        os.close(self._lock_fd)

    def _run(self) -> None:
        period = min(self.settings.fsync_interval, self.settings.segment_seconds / 2)
        while not self._stop.wait(period):
            try:
                self.tick()
            except OSError:  # a full disk, say: keep trying; the request path sees its own errors
                logger.exception("journal: fsync or rotation failed")

    def tick(self) -> None:
        """fsync what was appended since the last tick (interval mode) and seal segments due for it."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        if self.settings.fsync == "interval":
            for fd in dirty:  # only this thread closes segments, so these descriptors are still open
                os.fsync(fd)
        now, limit, age = time.monotonic(), self.settings.segment_bytes, self.settings.segment_seconds
        self.seal(lambda s: s.size >= limit or bool(s.size and now - s.opened >= age))

    def seal(self, due) -> list[Path]:
        """Closes the open segments `due(segment)` picks: fsync, close, rename to `.sealed`, fsync of the folder."""
        with self._lock:
            taken = {stream: s for stream, s in self._open.items() if due(s)}
            for stream, segment in taken.items():
                del self._open[stream]
                self._dirty.discard(segment.fd)
        sealed = [self._seal_file(segment) for segment in taken.values()]
        if sealed:
            if self.settings.fsync != "off":
                fsync_folder(self.folder)
            self.sealed_event.set()
        return sealed

    def _seal_file(self, segment: _OpenSegment) -> Path:
        if self.settings.fsync != "off":
            os.fsync(segment.fd)
        os.close(segment.fd)
        return seal_path(segment.path)

    def hold(self, size: int) -> None:
        """Counts an adopted segment (a dead process's) against the budget until it is shipped."""
        with self._lock:
            self.held_bytes += size

    def release(self, path: Path, size: int) -> None:
        """The shipper stored `path`: delete it and give its bytes back to the budget."""
        path.unlink()
        with self._lock:
            self.held_bytes = max(0, self.held_bytes - size)
            self._refusing = False


def seal_path(open_path: Path) -> Path:
    """Renames an `.open` segment to its sealed name (the seal time is part of the store objects' names)."""
    sealed = open_path.with_name(f"{open_path.name[: -len(OPEN_SUFFIX)]}+{utc_stamp()}{SEALED_SUFFIX}")
    os.rename(open_path, sealed)
    return sealed


def parse_segment_name(path: Path) -> tuple[str, str, str]:
    """(stream file name, sequence, seal stamp) of a sealed segment."""
    stream, sequence, stamp = path.name[: -len(SEALED_SUFFIX)].split("+")
    return stream, sequence, stamp
