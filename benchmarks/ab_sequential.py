"""How often the A/B decision promotes a challenger that is no better, and how fast it finds one that is.

Simulated trials of daily looks, each look driving `lifecycle.sequential.decide_ab_test`, the function
`ab_test_report` calls (through `lifecycle.ab_report`), with `Plan()`'s defaults: alpha 0.05 one-sided,
60,000 planned labelled requests, 30 days. Scenarios (2,000 labelled requests a day, challenger share 0.1):

- false_promote_rate: identical models at 99.0%, every request its own client (no key);
- clustered_false_promote_rate: identical models, ~600 clients sending 1-200 labelled requests each over
  the 30 days, each client's accuracy 98% +- 2 points (uniform); arms by the router's salted hash
  (`lifecycle.assignment.client_share`, salt = the trial's id), so a client keeps its arm all trial;
- power_0_5pt, median_days_to_decision: production 99.0%, challenger 99.5%;
- guardrail_days_to_stop: a challenger answering 5% of requests with an error (production 0.5%);
  guardrail_false_stop_rate: both at 0.5%.

Beside them, as the reference, the rule this replaces on the same data: a pooled two-sided z-test at alpha
afresh at every look, promoting when the challenger is ahead (`peeking_*`).

    nice -n 10 python benchmarks/ab_sequential.py --seed 0 --trials 2000

prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
from scipy import stats

from mnist_dagster.lifecycle.assignment import client_share
from mnist_dagster.lifecycle.sequential import ArmCounts, ArmServing, Decision, Plan, decide_ab_test

PER_DAY, SHARE, DAYS = 2_000, 0.1, 30
CHUNK = 100  # trials simulated at once in the clustered scenario (memory: ~600 clients x 30 days each)


def iid_days(rng: np.random.Generator, trials: int, accuracy_p: float, accuracy_c: float) -> dict[str, np.ndarray]:
    """Cumulative per-arm counts by day, (trials, days), every request its own client."""
    n_c = rng.binomial(PER_DAY, SHARE, size=(trials, DAYS))
    n_p = PER_DAY - n_c
    y_c, y_p = rng.binomial(n_c, accuracy_c), rng.binomial(n_p, accuracy_p)
    return {name: np.cumsum(value, axis=1) for name, value in {"n_p": n_p, "y_p": y_p, "n_c": n_c, "y_c": y_c}.items()}


def iid_counts(days: dict[str, np.ndarray], trial: int, day: int) -> tuple[ArmCounts, ArmCounts]:
    production = ArmCounts.independent(int(days["n_p"][trial, day]), int(days["y_p"][trial, day]))
    challenger = ArmCounts.independent(int(days["n_c"][trial, day]), int(days["y_c"][trial, day]))
    return production, challenger


def clustered_days(rng: np.random.Generator, trials: int, first_trial: int) -> dict[str, np.ndarray]:
    """Cumulative per-arm sums over clients by day, (trials, days), for identical models."""
    clients = round(DAYS * PER_DAY / 100.5)  # sizes uniform on 1..200: mean 100.5
    sizes = rng.integers(1, 201, size=(trials, clients))
    accuracy = 0.98 + rng.uniform(-0.02, 0.02, size=(trials, clients))
    daily = rng.multinomial(sizes, np.full(DAYS, 1.0 / DAYS))  # (trials, clients, days)
    n = np.cumsum(daily, axis=2, dtype=np.int64)
    y = np.cumsum(rng.binomial(daily, accuracy[..., None]), axis=2, dtype=np.int64)
    arm = np.array([[client_share(f"client-{c}", f"trial-{first_trial + t}") < SHARE for c in range(clients)]
                    for t in range(trials)])[..., None]  # fmt: skip
    out = {}
    for side, mask in (("c", arm), ("p", ~arm)):
        nm, ym = n * mask, y * mask
        out[f"n_{side}"], out[f"y_{side}"] = nm.sum(1), ym.sum(1)
        out[f"m_{side}"] = ((n > 0) & mask).sum(1)
        out[f"nn_{side}"], out[f"ny_{side}"], out[f"yy_{side}"] = (nm * n).sum(1), (nm * y).sum(1), (ym * y).sum(1)
    return out


def clustered_counts(days: dict[str, np.ndarray], trial: int, day: int) -> tuple[ArmCounts, ArmCounts]:
    def arm(side: str) -> ArmCounts:
        keys = ("n", "y", "m", "nn", "ny", "yy")
        n, y, m, nn, ny, yy = (days[f"{key}_{side}"][trial, day] for key in keys)
        return ArmCounts(int(n), int(y), int(m), float(nn), float(ny), float(yy))

    return arm("p"), arm("c")


Looks = Callable[[int, int], tuple]  # (trial, day) -> the two arms' counts (or serving) at that look


def run_trials(trials: int, counts: Looks, plan: Plan, serving: Looks | None = None) -> list[tuple[int, Decision]]:
    """Each trial looked at once a day until it ends: (the day it ended or 30, the last decision)."""
    ended = []
    for trial in range(trials):
        for day in range(DAYS):
            production, challenger = counts(trial, day)
            guard = serving(trial, day) if serving else None
            decision = decide_ab_test(production, challenger, day + 1, plan, day + 1, guard)
            if decision.trial_over:
                break
        ended.append((day + 1, decision))
    return ended


def peeking_promotes(days: dict[str, np.ndarray], alpha: float) -> float:
    """The replaced rule: a two-sided pooled z-test at alpha at every look, promote when ahead."""
    n_p, y_p, n_c, y_c = days["n_p"], days["y_p"], days["n_c"], days["y_c"]
    pooled = (y_p + y_c) / (n_p + n_c)
    spread = np.sqrt(pooled * (1 - pooled) * (1 / n_p + 1 / n_c))
    z = np.divide(y_c / n_c - y_p / n_p, spread, out=np.zeros_like(spread), where=spread > 0)
    crossed = (n_p >= 200) & (n_c >= 200) & (z > 0) & (2 * stats.norm.sf(np.abs(z)) < alpha)
    return float(crossed.any(axis=1).mean())


def error_serving(rng: np.random.Generator, trials: int, rate_c: float, rate_p: float):
    """Guardrail evidence per look: cumulative requests and errors per arm (all requests, labelled or not)."""
    n_c = np.cumsum(rng.binomial(PER_DAY, SHARE, size=(trials, DAYS)), axis=1)
    n_p = np.arange(1, DAYS + 1) * PER_DAY - n_c
    e_c = np.cumsum(rng.binomial(np.diff(n_c, prepend=0, axis=1), rate_c), axis=1)
    e_p = np.cumsum(rng.binomial(np.diff(n_p, prepend=0, axis=1), rate_p), axis=1)

    def serving(trial: int, day: int) -> tuple[ArmServing, ArmServing]:
        return (ArmServing(int(n_p[trial, day]), int(e_p[trial, day])),
                ArmServing(int(n_c[trial, day]), int(e_c[trial, day])))  # fmt: skip

    return serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=2_000)
    args = parser.parse_args()
    rng, plan, started = np.random.default_rng(args.seed), Plan(), time.perf_counter()
    trials = args.trials

    null = iid_days(rng, trials, 0.99, 0.99)
    null_ended = run_trials(trials, lambda t, d: iid_counts(null, t, d), plan)
    clustered_promoted, clustered_peeking = 0, 0.0
    for first in range(0, trials, CHUNK):
        chunk = clustered_days(rng, min(CHUNK, trials - first), first)
        ended = run_trials(len(chunk["n_p"]), lambda t, d: clustered_counts(chunk, t, d), plan)
        clustered_promoted += sum(decision.verdict == "promote" for _, decision in ended)
        clustered_peeking += peeking_promotes(chunk, plan.alpha) * len(chunk["n_p"])
    better = iid_days(rng, trials, 0.99, 0.995)
    better_ended = run_trials(trials, lambda t, d: iid_counts(better, t, d), plan)
    erring = run_trials(trials, lambda t, d: iid_counts(null, t, d), plan, error_serving(rng, trials, 0.05, 0.005))
    honest = run_trials(trials, lambda t, d: iid_counts(null, t, d), plan, error_serving(rng, trials, 0.005, 0.005))

    def rate(ended: list[tuple[int, Decision]], finding: str, field: str = "verdict") -> float:
        return round(sum(getattr(decision, field) == finding for _, decision in ended) / len(ended), 4)

    guardrail_days = [day for day, decision in erring if decision.finding == "guardrail breached"]
    result = {
        "false_promote_rate": rate(null_ended, "promote"),
        "clustered_false_promote_rate": round(clustered_promoted / trials, 4),
        "power_0_5pt": rate(better_ended, "promote"),
        "median_days_to_decision": float(np.median([day for day, _ in better_ended])),
        "guardrail_days_to_stop": float(np.median(guardrail_days)) if guardrail_days else None,
        "guardrail_stop_rate_5pct_errors": round(len(guardrail_days) / trials, 4),
        "guardrail_false_stop_rate": rate(honest, "guardrail breached", "finding"),
        "peeking_false_promote_rate": round(peeking_promotes(null, plan.alpha), 4),
        "peeking_clustered_false_promote_rate": round(clustered_peeking / trials, 4),
        "trials": trials, "seed": args.seed, "looks": DAYS, "labelled_per_day": PER_DAY, "share": SHARE,
        "alpha": plan.alpha, "max_labelled": plan.max_labelled,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
