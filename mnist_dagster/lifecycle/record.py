"""THE deployment record: which model version serves, which is on trial beside it, how traffic is split.

One small JSON object under `layout.DEPLOYMENT_KEY`, read by every party (the gate, the A/B report,
rollback, the endpoint, batch scoring, drift monitoring) and changed only by compare-and-swap
(`Store.write_if`), so two writers racing cannot both win: the loser re-reads and re-decides, or gives
up with `RecordConflict`. Model bundles are immutable and stored by version (`layout.bundle_prefix`);
the record only names versions, so there is nothing to copy and nothing that can disagree.

Plain Python: no Dagster, no HTTP.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from mnist_dagster.layout import DEPLOYMENT_KEY
from mnist_dagster.storage import Store, WriteConflict

RECORD_FORMAT = "mnist-dagster/deployment-v1"


class Strategy(StrEnum):
    """How a candidate that passed the gate is deployed, and how the endpoint splits traffic. Members are named
    as their values, because Dagster's config names an enum by its members' names (`strategy: ab_test`)."""

    replace = "replace"  # it becomes production; nothing else answers
    ab_test = "ab_test"  # production and a challenger each answer their share of clients
    shadow = "shadow"  # production answers everything; the challenger scores the same images off the request path


PRODUCTION, CHALLENGER = "production", "challenger"  # the two arms of a trial


class DeploymentError(RuntimeError):
    """A deployment that cannot be made as asked; nothing was changed."""


class RecordConflict(DeploymentError):
    """Another writer changed the record first, more times than we were willing to re-decide."""


@dataclass(frozen=True)
class Routing:
    """How the endpoint splits requests: the strategy in force and the challenger's share (ab_test only)."""

    strategy: Strategy = Strategy.replace
    challenger_traffic: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": str(self.strategy), "challenger_traffic": self.challenger_traffic}


@dataclass(frozen=True)
class HistoryEntry:
    """One production change: the version that went live, when, and why (in words)."""

    version: str
    at: str
    why: str


@dataclass(frozen=True)
class DeploymentRecord:
    """Production, the challenger on trial (if any) with its routing and trial identity, and the history.

    A trial starts when a challenger is published (`trial_started_at`, not a day boundary) and has its own
    `trial_id`, which also salts the endpoint's arm hash, so each trial draws a fresh audience.
    """

    production: str | None = None
    challenger: str | None = None
    strategy: Strategy = Strategy.replace
    share: float = 0.0
    trial_id: str | None = None
    trial_started_at: str | None = None
    history: tuple[HistoryEntry, ...] = field(default_factory=tuple)

    @property
    def routing(self) -> Routing:
        """What the endpoint does; without a challenger, production answers everything."""
        if self.challenger is None:
            return Routing()
        return Routing(self.strategy, self.share if self.strategy == Strategy.ab_test else 0.0)

    def to_json(self) -> bytes:
        document = {"format": RECORD_FORMAT, **asdict(self), "strategy": str(self.strategy)}
        return json.dumps(document, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> DeploymentRecord:
        """Parse and validate; raises `ValueError` saying what is wrong (the endpoint then keeps what it serves)."""
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != RECORD_FORMAT:
            raise ValueError(f"not a deployment record (format {RECORD_FORMAT} expected)")
        share = document.get("share", 0.0)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be a number in [0, 1], got {share!r}")
        return cls(
            production=document.get("production"),
            challenger=document.get("challenger"),
            strategy=Strategy(document.get("strategy", Strategy.replace)),
            share=float(share),
            trial_id=document.get("trial_id"),
            trial_started_at=document.get("trial_started_at"),
            history=tuple(HistoryEntry(**entry) for entry in document.get("history", [])),
        )

    def with_production(self, version: str, why: str) -> DeploymentRecord:
        """`version` serves; any trial ends (a new production makes the comparison meaningless)."""
        entry = HistoryEntry(version, now_iso(), why)
        return DeploymentRecord(production=version, history=(*self.history, entry))

    def with_challenger(self, version: str, routing: Routing) -> DeploymentRecord:
        """`version` goes on trial beside production under `routing`: a new trial, with a new id and start."""
        if routing.strategy == Strategy.replace:
            raise DeploymentError("a challenger needs strategy ab_test or shadow; replace deploys to production")
        if self.production is None:
            raise DeploymentError("no production model to compare a challenger with")
        return replace(
            self,
            challenger=version,
            strategy=routing.strategy,
            share=routing.challenger_traffic,
            trial_id=uuid.uuid4().hex,
            trial_started_at=now_iso(),
        )

    def without_challenger(self) -> DeploymentRecord:
        """The trial ends; production answers everything again."""
        return replace(self, challenger=None, strategy=Strategy.replace, share=0.0, trial_id=None, trial_started_at=None)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def read_record(store: Store) -> DeploymentRecord:
    """The record in force; none written yet means nothing is deployed."""
    return read_record_with_tag(store)[0]


def read_record_with_tag(store: Store) -> tuple[DeploymentRecord, str | None]:
    """The record and the tag a conditional write must name (None: no record yet)."""
    try:
        data, tag = store.read_with_tag(DEPLOYMENT_KEY)
    except FileNotFoundError:
        return DeploymentRecord(), None
    return DeploymentRecord.from_json(data), tag


def write_record(store: Store, record: DeploymentRecord, tag: str | None) -> None:
    """Replace the record read with `tag`; raises `RecordConflict` if anyone changed it since."""
    try:
        store.write_if(DEPLOYMENT_KEY, record.to_json(), tag)
    except WriteConflict as error:
        raise RecordConflict(f"the deployment record changed while this change was being made: {error}") from error


def change_record(
    store: Store, change: Callable[[DeploymentRecord], DeploymentRecord], attempts: int = 5
) -> tuple[DeploymentRecord, DeploymentRecord]:
    """Apply `change` to the current record and write the result atomically; returns (before, after).

    On a lost race the change is decided again on the fresh record (it may now raise `DeploymentError`,
    e.g. a promotion whose trial another writer already ended), up to `attempts` times.
    """
    for _ in range(attempts):
        before, tag = read_record_with_tag(store)
        after = change(before)
        try:
            write_record(store, after, tag)
        except RecordConflict:
            continue
        return before, after
    raise RecordConflict(f"gave up after {attempts} attempts: the deployment record kept changing")
