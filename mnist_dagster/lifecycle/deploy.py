"""Deploying: publish, promote, roll back, as changes of the one deployment record.

Every change stores the bundle first (immutable, by version) and flips the record last, by
compare-and-swap (`record.change_record`), so a reader sees the old state or the new one, and two
writers racing cannot both win. The gate (`production_digit_classifier`), the A/B report and
`rollback_job` call these; the endpoint, batch scoring and drift monitoring only read the record.
Dagster-free.
"""

from __future__ import annotations

from mnist_dagster.lifecycle.record import (
    DeploymentError,
    DeploymentRecord,
    HistoryEntry,
    Routing,
    Strategy,
    change_record,
    read_record,
)
from mnist_dagster.scoring import bundle as bundles
from mnist_dagster.storage import Store


def production_bundle(store: Store) -> bundles.Bundle | None:
    """The verified bundle of the version in production, or None before the first deployment."""
    version = read_record(store).production
    return None if version is None else bundles.load(store, version)


def current_challenger(store: Store) -> bundles.Bundle | None:
    """The verified bundle of the challenger on trial, or None when no trial runs."""
    version = read_record(store).challenger
    return None if version is None else bundles.load(store, version)


def production_history(store: Store) -> tuple[HistoryEntry, ...]:
    """Every production version in the order it went live, with when and why."""
    return read_record(store).history


def make_production(store: Store, bundle: bundles.Bundle, why: str) -> str | None:
    """`bundle` becomes production (ending any trial); returns the version it replaced."""
    bundles.store_bundle(store, bundle)
    before, _ = change_record(store, lambda record: record.with_production(bundle.version, why))
    return before.production


def start_trial(store: Store, bundle: bundles.Bundle, routing: Routing) -> DeploymentRecord:
    """`bundle` goes on trial beside production under `routing` (ab_test or shadow); a new trial id and start."""
    if routing.strategy == Strategy.replace:
        raise DeploymentError("a challenger needs strategy ab_test or shadow; replace deploys to production")
    bundles.store_bundle(store, bundle)
    _, after = change_record(store, lambda record: record.with_challenger(bundle.version, routing))
    return after


def promote_challenger(store: Store, why: str = "promoted after an A/B test") -> tuple[str | None, str]:
    """The challenger on trial becomes production; returns (old, new) production versions."""

    def promote(record: DeploymentRecord) -> DeploymentRecord:
        if record.challenger is None:
            raise DeploymentError("no challenger on trial to promote")
        return record.with_production(record.challenger, why)

    before, after = change_record(store, promote)
    assert after.production is not None
    return before.production, after.production


def end_trial(store: Store) -> DeploymentRecord:
    """The trial ends without a promotion (a `keep` decision, a guardrail breach); production serves alone."""
    _, after = change_record(store, DeploymentRecord.without_challenger)
    return after


def previous_production_version(record: DeploymentRecord) -> str:
    """The version production had before the current one."""
    earlier = [entry.version for entry in record.history if entry.version != record.production]
    if not earlier:
        raise DeploymentError(f"production has had no version before {record.production}: nothing to roll back to")
    return earlier[-1]


def roll_back(store: Store, version: str | None = None) -> tuple[str | None, str]:
    """Production goes back to `version` (default: the previous one); returns (replaced, restored).

    The bundle is read and verified first: a version that does not exist, fails its checksum or is already
    production raises `DeploymentError` and production stays as it was. Like any new production, it ends a
    trial that was running.
    """
    target = version or previous_production_version(read_record(store))
    try:
        bundles.load(store, target)
    except bundles.BundleError as error:
        raise DeploymentError(f"cannot roll back to version {target}: {error}") from error

    def restore(record: DeploymentRecord) -> DeploymentRecord:
        if target == record.production:
            raise DeploymentError(f"version {target} is already in production: nothing to roll back")
        return record.with_production(target, f"rollback to {target}")

    before, _ = change_record(store, restore)
    return before.production, target
