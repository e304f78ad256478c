"""Champion vs challenger: which model answers a request. The contract with the Dagster side, which writes
the files below (the server only reads them):

- The production bundle is published under `serving/` (`layout.SERVING_ROOT`) as always. A challenger,
  when there is one, is published the same way (`bundle.publish`, same bundle format) under
  `serving-challenger/` (`layout.CHALLENGER_ROOT`).
- `serving-routing.json` (`layout.ROUTING_KEY`) says how traffic is split:

      {"strategy": "replace" | "ab_test" | "shadow", "challenger_traffic": 0.1}

  `replace`: production answers everything; a challenger, if published, is ignored.
  `ab_test`: a share `challenger_traffic` (a number in [0, 1], required for ab_test) of requests is
  answered by the challenger. A request with an `X-Client-Key` header always gets the same arm for the
  same key and share (sha256 of the key -> a number in [0, 1); below the share => challenger; raising
  the share only moves keys towards the challenger); a request without one gets a random draw.
  `shadow`: production answers everything; the challenger also scores the same preprocessed image off
  the request path and its digit is recorded in the prediction log (`shadow_digit`, `shadow_version`).
  Other keys are ignored (Dagster may add its own, e.g. when the test started). An absent file means
  `replace`; an unreadable or invalid one too, logged once and the reason shown in `/health` as `routing_note`.
- Order of writes: the challenger bundle first, then the routing file. To end a test, write routing
  `replace` (the challenger bundle may stay; it is ignored). To promote the challenger, publish its
  bundle under `serving/` and write `replace`.
- While the routing names a challenger that is not loaded (none published, or its bundle refused), all
  traffic goes to production.

The server polls the three (each model root by its own `ModelWatcher`, the routing file by a
`RoutingWatcher`) every `--poll-seconds` and swaps each with one assignment; the `Router` turns the
three into an `Assignment` per request with a few attribute reads (kept off the store and cheap enough
for the ASGI fast path).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from mnist_dagster.lifecycle import assignment
from mnist_dagster.serving.service import LoadedModel, ModelWatcher, Poller
from mnist_dagster.storage import Store

logger = logging.getLogger("mnist_dagster.serving")

REPLACE, AB_TEST, SHADOW = "replace", "ab_test", "shadow"
STRATEGIES = (REPLACE, AB_TEST, SHADOW)
PRODUCTION, CHALLENGER = "production", "challenger"
CLIENT_KEY_HEADER = "X-Client-Key"


@dataclass(frozen=True)
class Routing:
    strategy: str = REPLACE
    challenger_traffic: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "challenger_traffic": self.challenger_traffic}


NO_ROUTING = Routing()


def parse_routing(data: bytes) -> Routing:
    """The routing file's bytes -> `Routing`; raises `ValueError` saying what is wrong with them."""
    document = json.loads(data)
    if not isinstance(document, dict):
        raise ValueError("must be a JSON object")
    strategy = document.get("strategy", REPLACE)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy != AB_TEST:
        return Routing(strategy)
    share = document.get("challenger_traffic")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"ab_test needs 'challenger_traffic', a number in [0, 1] (got {share!r})")
    return Routing(AB_TEST, float(share))


class RoutingWatcher(Poller):
    """Keeps the routing file's content as `current`, polled off the request path; anything wrong => replace."""

    thread_name = "routing-watcher"

    def __init__(self, store: Store, key: str, poll_seconds: float = 1.0) -> None:
        super().__init__(poll_seconds)
        self.store, self.key = store, key
        self.current: Routing = NO_ROUTING
        self.note: str | None = None  # why the file is not in force (missing, unreadable, invalid)

    def refresh(self) -> None:
        routing, note, level = self._read()
        if note is not None and note != self.note:
            logger.log(level, "%s", note)  # once per new state, not once per poll
        if routing != self.current:
            logger.info("Routing is now %s (was %s)", routing.as_dict(), self.current.as_dict())
            self.current = routing  # replaced only on a change, so the Router's identity check stays cheap
        self.note = note

    def _read(self) -> tuple[Routing, str | None, int]:
        """The routing in the file; and, when it is not used, why (and how loudly to log it)."""
        try:
            return parse_routing(self.store.read_bytes(self.key)), None, logging.INFO
        except FileNotFoundError:
            return NO_ROUTING, f"no {self.key}: serving production only", logging.INFO
        except Exception as error:  # noqa: BLE001 - bad JSON, a bad value, a store outage: all mean replace
            problem = f"cannot use {self.key} ({type(error).__name__}: {error}); serving production only"
            return NO_ROUTING, problem, logging.ERROR


def client_share(client_key: str, trial_id: str = "") -> float:
    """A client key -> a number in [0, 1), the same for the same key within a trial on every server and
    every run, and drawn afresh for each trial (salted with its id: `lifecycle.assignment`)."""
    return assignment.client_share(client_key, trial_id)


def goes_to_challenger(share: float, client_key: str | None, trial_id: str = "") -> bool:
    """Whether a request is in the challenger's `share`: by its key's salted hash (sticky for the trial),
    else by a random draw."""
    return (client_share(client_key, trial_id) if client_key else random.random()) < share


@dataclass(frozen=True)
class Assignment:
    """Who answers a request (`arm`, `model`) and who scores it in the shadow; `label` is the
    (arm, version) pair remembered per prediction id, one shared tuple per assignment."""

    arm: str
    model: LoadedModel
    shadow: LoadedModel | None = None
    label: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", (self.arm, self.model.version))


@dataclass(frozen=True)
class _Table:
    """The assignments for one state of (production, challenger, routing), built once per change."""

    production: LoadedModel | None
    challenger: LoadedModel | None
    routing: Routing
    default: Assignment | None  # what answers outside the challenger's share; None: no model at all
    challenger_arm: Assignment | None  # set only in an A/B test with a challenger loaded
    share: float


def _table(production: LoadedModel | None, challenger: LoadedModel | None, routing: Routing) -> _Table:
    if production is None:
        return _Table(production, challenger, routing, None, None, 0.0)
    if challenger is None or routing.strategy == REPLACE:
        return _Table(production, challenger, routing, Assignment(PRODUCTION, production), None, 0.0)
    if routing.strategy == SHADOW:
        return _Table(production, challenger, routing, Assignment(PRODUCTION, production, challenger), None, 0.0)
    arms = Assignment(PRODUCTION, production), Assignment(CHALLENGER, challenger)
    return _Table(production, challenger, routing, *arms, routing.challenger_traffic)


class Router:
    """Chooses the `Assignment` of each request from what the three watchers hold right now."""

    def __init__(self, production: ModelWatcher, challenger: ModelWatcher, routing: RoutingWatcher) -> None:
        self.production, self.challenger, self.routing = production, challenger, routing
        self._table = _table(None, None, NO_ROUTING)

    def choose(self, client_key: str | None = None) -> Assignment | None:
        """The assignment for one request (None while no production model is loaded). Costs three
        attribute reads and, in an A/B test, one hash or random draw."""
        table = self._current_table()
        if table.challenger_arm is not None and goes_to_challenger(table.share, client_key):
            return table.challenger_arm
        return table.default

    def _current_table(self) -> _Table:
        production, challenger, routing = self.production.current, self.challenger.current, self.routing.current
        table = self._table
        if table.production is not production or table.challenger is not challenger or table.routing is not routing:
            table = self._table = _table(production, challenger, routing)
        return table

    def status(self) -> dict[str, Any]:
        """What `/health` says about the challenger and the routing in force."""
        challenger = self.challenger.status()
        return {
            "challenger_version": challenger["model_version"],
            "challenger_loaded_at": challenger["loaded_at"],
            "challenger_refused": challenger["refused"],
            "routing": self.routing.current.as_dict(),
            "routing_note": self.routing.note,
        }
