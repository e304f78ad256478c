"""Deployments in the store: production, a challenger, how traffic is split, history, promotion, rollback.

Dagster-free, so the assets and jobs that decide (`production_digit_classifier`, `ab_test_report`,
`rollback_job`) and the step that publishes to the endpoint (`digit_predictions`) share one account of
what is deployed. Every change writes the bundle's files first and flips a pointer last (`bundle.publish`),
so a reader sees the old state or the new one.

    models/production/<v>/, CURRENT.json, HISTORY.json   what serves; every version that ever did, in order
    models/challenger/<v>/, CURRENT.json                 the candidate on trial in an A/B test or in shadow
    models/routing.json                                   {"strategy": "replace" | "ab_test" | "shadow",
                                                           "challenger_traffic": 0.1}
`publish_to_endpoint` copies that state to where the server reads it (`serving/`, `serving-challenger/`,
`serving-routing.json`; see `mnist_dagster.layout`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Literal

from mnist_dagster.layout import CHALLENGER_ROOT, PRODUCTION_ROOT, ROUTING_KEY, SERVING_ROOT
from mnist_dagster.serving import bundle as bundles
from mnist_dagster.storage import Store

Strategy = Literal["replace", "ab_test", "shadow"]
CHALLENGER_MODEL_ROOT = "models/challenger"
ROUTING_INTENT_KEY = "models/routing.json"
HISTORY_KEY = f"{PRODUCTION_ROOT}/HISTORY.json"


class DeploymentError(RuntimeError):
    """A deployment that cannot be made as asked; nothing was changed."""


@dataclass(frozen=True)
class Routing:
    strategy: Strategy = "replace"
    challenger_traffic: float = 0.1

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def read_routing(store: Store, key: str = ROUTING_INTENT_KEY) -> Routing:
    """The routing in force; none written yet means production only."""
    if not store.exists(key):
        return Routing()
    return Routing(**json.loads(store.read_bytes(key)))


def production_history(store: Store) -> list[dict]:
    """Every production version in the order it went live: `{"version", "at", "why"}`."""
    return json.loads(store.read_bytes(HISTORY_KEY)) if store.exists(HISTORY_KEY) else []


def make_production(store: Store, bundle: bundles.Bundle, why: str) -> str | None:
    """`bundle` becomes production (files, history, then the pointer); ends any A/B test. Returns the old version."""
    previous = bundles.current_version(store, PRODUCTION_ROOT)
    history = production_history(store)
    history.append({"version": bundle.version, "at": datetime.now(timezone.utc).isoformat(), "why": why})
    store.write_bytes(HISTORY_KEY, json.dumps(history, indent=1).encode())
    bundles.publish(store, PRODUCTION_ROOT, bundle)
    store.write_bytes(ROUTING_INTENT_KEY, Routing().to_bytes())
    return previous


def start_trial(store: Store, bundle: bundles.Bundle, routing: Routing) -> None:
    """`bundle` becomes the challenger beside production, under `routing` (ab_test or shadow)."""
    if routing.strategy == "replace":
        raise DeploymentError("a challenger needs strategy ab_test or shadow; replace deploys to production")
    if bundles.current_version(store, PRODUCTION_ROOT) is None:
        raise DeploymentError("no production model to compare a challenger with")
    bundles.publish(store, CHALLENGER_MODEL_ROOT, bundle)
    store.write_bytes(ROUTING_INTENT_KEY, routing.to_bytes())


def current_challenger(store: Store) -> bundles.Bundle | None:
    """The challenger on trial, or None when routing is `replace`."""
    if read_routing(store).strategy == "replace":
        return None
    return bundles.load_current(store, CHALLENGER_MODEL_ROOT)


def promote_challenger(store: Store) -> tuple[str | None, str]:
    """The challenger on trial becomes production; returns (old, new) production versions."""
    challenger = current_challenger(store)
    if challenger is None:
        raise DeploymentError("no challenger on trial to promote")
    return make_production(store, challenger, "promoted after an A/B test"), challenger.version


def previous_production_version(store: Store) -> str:
    """The version production had before the current one."""
    current = bundles.current_version(store, PRODUCTION_ROOT)
    earlier = [entry["version"] for entry in production_history(store) if entry["version"] != current]
    if not earlier:
        raise DeploymentError(f"production has had no version before {current}: nothing to roll back to")
    return earlier[-1]


def roll_back(store: Store, version: str | None = None) -> tuple[str | None, str]:
    """Production goes back to `version` (default: the previous one); returns (replaced, restored).

    The bundle is read and verified first: a version that does not exist, fails its checksum or is already
    production raises `DeploymentError` and production stays as it was. Like any new production, it ends a
    trial that was running.
    """
    target = version or previous_production_version(store)
    if target == bundles.current_version(store, PRODUCTION_ROOT):
        raise DeploymentError(f"version {target} is already in production: nothing to roll back")
    try:
        restored = bundles.load(store, PRODUCTION_ROOT, target)
    except bundles.BundleError as error:
        raise DeploymentError(f"cannot roll back to version {target}: {error}") from error
    return make_production(store, restored, f"rollback to {target}"), target


def publish_to_endpoint(store: Store, production: bundles.Bundle) -> Routing:
    """What the server reads: production, the challenger when a trial runs, and the routing (written last)."""
    bundles.publish(store, SERVING_ROOT, production)
    routing = read_routing(store)
    challenger = current_challenger(store)
    if challenger is not None:
        bundles.publish(store, CHALLENGER_ROOT, challenger)
    store.write_bytes(ROUTING_KEY, routing.to_bytes())
    return routing
