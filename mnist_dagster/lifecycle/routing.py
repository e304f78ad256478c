"""Champion vs challenger: which model answers a request, from the deployment in force (the contract between
the deployment record and a server).

The deployment record (`record.py`) names production, the challenger and the routing; `DeploymentWatcher`
(`watcher.py`) keeps the loaded `Deployment`. Here:

- `replace`: production answers everything.
- `ab_test`: a share `challenger_traffic` of clients is answered by the challenger. A request with a client
  key (the `X-Client-Key` header) always gets the same arm within a trial (`assignment.client_share`: sha256
  of trial id + key -> a number in [0, 1); below the share => challenger). The hash is salted with the trial
  id, so each trial draws its own audience rather than showing the same clients every challenger. A request
  without a key gets a random draw.
- `shadow`: production answers everything; the challenger also scores the same preprocessed image off the
  request path, and its digit is recorded in the prediction log (`shadow_digit`, `shadow_version`).
- While the record names a challenger that is not loaded (refused, or still loading), production answers.

The `Router` turns the deployment into an `Assignment` per request with a few attribute reads and, in an
A/B test, one hash or random draw (cheap enough for every request).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mnist_dagster.lifecycle.assignment import client_share
from mnist_dagster.lifecycle.record import CHALLENGER, PRODUCTION, Strategy
from mnist_dagster.lifecycle.watcher import Deployment, DeploymentWatcher, LoadedModel


def goes_to_challenger(share: float, client_key: str | None, salt: str = "") -> bool:
    """Whether a request is in the challenger's `share`: by its key's salted hash (sticky), else a random draw."""
    return (client_share(client_key, salt) if client_key else random.random()) < share


@dataclass(frozen=True)
class Assignment:
    """Who answers a request (`arm`, `model`) and who scores it in the shadow."""

    arm: str
    model: LoadedModel
    shadow: LoadedModel | None = None


@dataclass(frozen=True)
class _Table:
    """The assignments for one `Deployment`, built once per change."""

    deployment: Deployment
    default: Assignment | None  # what answers outside the challenger's share; None: no model at all
    challenger_arm: Assignment | None  # set only in an A/B test with a challenger loaded
    share: float
    salt: str


def _table(deployment: Deployment) -> _Table:
    production, challenger, routing = deployment.production, deployment.challenger, deployment.routing
    salt = deployment.trial_id or ""
    if production is None:
        return _Table(deployment, None, None, 0.0, salt)
    if challenger is None or routing.strategy == Strategy.replace:
        return _Table(deployment, Assignment(PRODUCTION, production), None, 0.0, salt)
    if routing.strategy == Strategy.shadow:
        return _Table(deployment, Assignment(PRODUCTION, production, challenger), None, 0.0, salt)
    arms = Assignment(PRODUCTION, production), Assignment(CHALLENGER, challenger)
    return _Table(deployment, *arms, routing.challenger_traffic, salt)


class Router:
    """Chooses the `Assignment` of each request from what the watcher holds right now."""

    def __init__(self, watcher: DeploymentWatcher) -> None:
        self.watcher = watcher
        self._table = _table(Deployment())

    def choose(self, client_key: str | None = None) -> Assignment | None:
        """The assignment for one request (None while no production model is loaded)."""
        table = self._table
        if table.deployment is not self.watcher.current:
            table = self._table = _table(self.watcher.current)
        if table.challenger_arm is not None and goes_to_challenger(table.share, client_key, table.salt):
            return table.challenger_arm
        return table.default
