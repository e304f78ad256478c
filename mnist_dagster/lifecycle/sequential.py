"""The A/B decision, read as often as anyone likes: a one-sided group-sequential test with clients as the unit.

Why sequential. `ab_test_report` runs every day and on demand. A fixed-level test repeated at every look
promotes an identical challenger far more often than its level says (11.9% at "5%" over 30 daily looks),
because one of many looks will cross by chance. So the level is spent over the trial.

The design: O'Brien-Fleming alpha spending (Lan-DeMets), monitored continuously. With information fraction
t (labelled requests so far over the planned maximum `Plan.max_labelled`), the challenger is promoted when

    Z(t) >= c / sqrt(t),        c = Phi^-1(1 - alpha / 2)

Under "no difference" Z(t) sqrt(t) is a standard Brownian motion in t, and the chance that it ever reaches
the constant c before t = 1 is 2 (1 - Phi(c)) = alpha (the reflection principle). So the boundary holds
its one-sided level for ANY number and timing of looks: daily, hourly, or whenever someone opens the page;
looking at fewer points only makes it conservative. The alpha spent by t, 2 (1 - Phi(c / sqrt(t))), is the
Lan-DeMets O'Brien-Fleming spending function, reported at every look. Its shape is the usual one: very
strict early (a handful of lucky labels never promotes), close to a fixed-horizon test at the end (c = 1.96
instead of 1.645 at alpha 0.05), so little power is lost. Only the proportionality of information to
labelled requests matters, not its scale. Chosen over always-valid mixture SPRTs because it needs no
mixture scale for the accuracy difference, its boundary is one number a person can check by hand, and it
keeps more power at the planned horizon; its price is a planned maximum, which the trial needs anyway
(futility: at the maximum sample or duration without crossing, the verdict is `keep`).

Clients as the unit. One client sends many requests and clients differ, so requests are not independent.
Each arm's accuracy is a ratio estimate sum(correct) / sum(requests) over its clients. Its variance is
the larger of two, both centred on the pooled accuracy p (the null's common value, like a score test, so
an arm with no error yet is not credited with zero variance): the arm's own cluster-robust (delta-method,
CR1) variance m / (m - 1) * sum_c (y_c - p n_c)^2 / n^2, and the random-effects variance
p (1 - p) / n + s^2 (sum_c n_c^2 - n) / n^2 with the between-client variance s^2 estimated on the
clients of both arms. The second matters: the challenger's few clients alone estimate their spread
noisily, and that noise runs with its lead (measured: 4.4% false promotions with the arm's own CR1
alone, 3.0% with both; 3.3% without clusters). A request without a client key is its own client.

Non-binding futility: a challenger significantly worse, Z <= -c / sqrt(t), ends the trial with `keep`.
It can only remove promotions, so the level holds.

Guardrails, checked before labels: the challenger's error rate (5xx and refusals) against production's,
by a one-sided always-valid mixture SPRT (half-normal mixture, scale `Plan.error_effect`), since errors
arrive with every request and have no planned sample; and its p99 latency, by a margin rule (over
`latency_ratio` times production's once each arm has `min_timed` timed requests). A breach ends the
trial with `keep` at once.

Shadow mode: both models answered the same requests, so McNemar's exact test (one-sided: the challenger
alone right more often than production alone) on the discordant requests, at the nominal level
Phi(-c / sqrt(t)) the same boundary gives at this look.

No Dagster, no HTTP: `ab_report` feeds it from the logs, and `benchmarks/ab_sequential.py` from a
simulation, through the same `decide_ab_test` / `decide_shadow`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import special, stats

from mnist_dagster.lifecycle.record import Strategy

Verdict = Literal["promote", "keep", "need_more_data"]

AB_TEST = (
    "one-sided group-sequential two-proportion z-test, O'Brien-Fleming alpha spending (Lan-DeMets, continuous "
    "monitoring), clients as the unit (cluster-robust delta-method variance)"
)
SHADOW = (
    "one-sided McNemar's exact test on the paired requests, at the O'Brien-Fleming group-sequential nominal "
    "level (Lan-DeMets, continuous monitoring)"
)


@dataclass(frozen=True)
class Plan:
    """The trial's design: fixed before it starts, so that no look can bend it."""

    alpha: float = 0.05  # one-sided: the chance of ever promoting a challenger that is not better
    max_labelled: int = 60_000  # planned labelled requests (both arms): information fraction = labelled / this
    max_days: float = 30.0  # the trial ends here at the latest (keep, unless promoted before)
    min_labelled_per_arm: int = 200  # below this in either arm, no verdict from labels yet (guardrails still run)
    guardrail_alpha: float = 0.05  # one-sided: the chance of ever stopping on errors a challenger that errs no more
    error_effect: float = 0.01  # the error-rate increase the error guardrail is tuned to catch fastest
    latency_ratio: float = 1.5  # p99 latency guardrail: breach above this many times production's p99
    min_timed: int = 1_000  # requests with a latency, per arm, before the p99s are compared

    @property
    def constant(self) -> float:
        """c, the boundary on the B-value scale: P(a Brownian motion reaches c before t = 1) = alpha."""
        return float(special.ndtri(1.0 - self.alpha / 2.0))


def information_fraction(labelled: int, plan: Plan) -> float:
    return min(1.0, labelled / plan.max_labelled)


def boundary(fraction: float, plan: Plan) -> float:
    """The z the statistic must reach at information fraction `fraction` (inf before any information)."""
    return plan.constant / math.sqrt(fraction) if fraction > 0 else math.inf


def alpha_spent(fraction: float, plan: Plan) -> float:
    """The Lan-DeMets O'Brien-Fleming spending function: the level used up by `fraction`."""
    return float(2.0 * special.ndtr(-boundary(fraction, plan))) if fraction > 0 else 0.0


@dataclass(frozen=True)
class ArmCounts:
    """One arm's labelled requests, summed per client: what the cluster-robust variance needs."""

    requests: int  # labelled requests
    correct: int
    clients: int  # distinct clients among them (a request without a key is its own client)
    sum_n2: float  # sum over clients of n_c^2
    sum_ny: float  # sum over clients of n_c * y_c
    sum_y2: float  # sum over clients of y_c^2

    @classmethod
    def from_clients(cls, requests: Sequence[int] | np.ndarray, correct: Sequence[int] | np.ndarray) -> ArmCounts:
        """From each client's labelled requests n_c and correct answers y_c."""
        n, y = np.asarray(requests, dtype=float), np.asarray(correct, dtype=float)
        n, y = n[n > 0], y[n > 0]
        return cls(int(n.sum()), int(y.sum()), len(n), float(n @ n), float(n @ y), float(y @ y))

    @classmethod
    def independent(cls, requests: int, correct: int) -> ArmCounts:
        """Every request its own client (none sent a key)."""
        return cls(requests, correct, requests, requests, correct, correct)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.requests if self.requests else None

    def squares(self, pooled: float) -> float:
        """sum over clients of (y_c - pooled n_c)^2: each client's departure from the common accuracy."""
        return max(self.sum_y2 - 2.0 * pooled * self.sum_ny + pooled * pooled * self.sum_n2, 0.0)

    def variance(self, pooled: float, between: float) -> float:
        """Var(accuracy) under "no difference": the larger of the random-effects variance with the
        between-client variance `between` estimated from both arms, and this arm's own cluster-robust
        (CR1 sandwich) variance. Never below the binomial variance (clustering only adds)."""
        binomial = pooled * (1.0 - pooled) / self.requests
        shared = binomial + between * (self.sum_n2 - self.requests) / (self.requests * self.requests)
        if self.clients < 2 or self.sum_n2 <= self.requests:  # no client sent two: nothing is clustered
            return shared
        robust = self.clients / (self.clients - 1) * self.squares(pooled) / (self.requests * self.requests)
        return max(shared, robust)


def between_client_variance(production: ArmCounts, challenger: ArmCounts, pooled: float) -> float:
    """The variance of clients' own accuracies around the common one, by the method of moments on all
    clients of both arms: E sum (y_c - p n_c)^2 = N (p (1 - p) - s^2) + s^2 sum n_c^2. Under "no
    difference" both arms draw their clients from one population (the salted hash), so the ~540
    production clients steady an estimate the challenger's ~60 alone would make noisily; 0 when every
    client sent one request."""
    requests = production.requests + challenger.requests
    excess = production.sum_n2 + challenger.sum_n2 - requests
    if excess <= 0:
        return 0.0
    squares = production.squares(pooled) + challenger.squares(pooled)
    return max(0.0, (squares - requests * pooled * (1.0 - pooled)) / excess)


def difference_z(production: ArmCounts, challenger: ArmCounts) -> tuple[float, float]:
    """(challenger accuracy minus production's, its z under "no difference"); z = 0 when nobody erred."""
    pooled = (production.correct + challenger.correct) / (production.requests + challenger.requests)
    difference = challenger.correct / challenger.requests - production.correct / production.requests
    between = between_client_variance(production, challenger, pooled)
    spread = math.sqrt(production.variance(pooled, between) + challenger.variance(pooled, between))
    return difference, (difference / spread if spread > 0 else 0.0)


@dataclass(frozen=True)
class ArmServing:
    """What an arm served, labelled or not: the guardrails' evidence."""

    requests: int = 0
    errors: int = 0  # answered 5xx or refused
    p99_ms: float | None = None
    timed: int = 0  # requests with a latency behind p99_ms


@dataclass(frozen=True)
class Guardrail:
    name: str  # "error rate" | "p99 latency"
    breached: bool
    detail: str  # the numbers and the rule, in words


def error_guardrail(production: ArmServing, challenger: ArmServing, plan: Plan) -> Guardrail:
    """One-sided always-valid test that the challenger errs more: half-normal mixture SPRT on the difference
    of error rates (pooled variance), breached when the mixture likelihood ratio reaches 1 / guardrail_alpha
    (Ville's inequality keeps the level however often it is checked)."""
    if min(production.requests, challenger.requests) == 0:
        return Guardrail("error rate", False, "no requests served yet in one arm")
    rate_p, rate_c = production.errors / production.requests, challenger.errors / challenger.requests
    ratio = mixture_likelihood_ratio(
        rate_c - rate_p,
        _pooled_variance(production.errors + challenger.errors, production.requests, challenger.requests),
        plan.error_effect,
    )
    threshold = 1.0 / plan.guardrail_alpha
    words = (
        f"challenger errors {100 * rate_c:.2f}% of {challenger.requests} requests against production's "
        f"{100 * rate_p:.2f}% of {production.requests}; mixture likelihood ratio {ratio:.3g}"
    )
    if ratio >= threshold:
        return Guardrail("error rate", True, f"{words} >= {threshold:g}: the challenger errs more")
    return Guardrail("error rate", False, f"{words} < {threshold:g}")


def _pooled_variance(events: int, n_a: int, n_b: int) -> float:
    pooled = events / (n_a + n_b)
    return pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)


def mixture_likelihood_ratio(estimate: float, variance: float, scale: float) -> float:
    """The one-sided mixture SPRT statistic for a normal estimate with known `variance`: the likelihood
    ratio of "difference theta" against 0, averaged over a half-normal prior on theta > 0 with `scale`.

        2 sqrt(V / (V + s^2)) exp(x^2 s^2 / (2 V (V + s^2))) Phi(x s / sqrt(V (V + s^2)))

    A nonnegative martingale under theta = 0 (no library offers it; tested against a simulation)."""
    if variance <= 0:
        return 0.0 if estimate <= 0 else math.inf
    total = variance + scale * scale
    exponent = estimate * estimate * scale * scale / (2.0 * variance * total)
    tail = float(special.ndtr(estimate * scale / math.sqrt(variance * total)))
    return 2.0 * math.sqrt(variance / total) * math.exp(min(exponent, 700.0)) * tail


def latency_guardrail(production: ArmServing, challenger: ArmServing, plan: Plan) -> Guardrail:
    """A margin rule, not a test: the challenger's p99 over `latency_ratio` times production's."""
    if min(production.timed, challenger.timed) < plan.min_timed or None in (production.p99_ms, challenger.p99_ms):
        return Guardrail("p99 latency", False, f"fewer than {plan.min_timed} timed requests in an arm: not compared")
    limit = plan.latency_ratio * production.p99_ms
    words = f"challenger p99 {challenger.p99_ms:.1f} ms against production's {production.p99_ms:.1f} ms"
    if challenger.p99_ms > limit:
        return Guardrail("p99 latency", True, f"{words}: over {plan.latency_ratio:g}x ({limit:.1f} ms)")
    return Guardrail("p99 latency", False, f"{words}: within {plan.latency_ratio:g}x")


@dataclass(frozen=True)
class Decision:
    """The verdict at one look, with everything a person needs to check it."""

    verdict: Verdict
    finding: str  # challenger better | challenger significantly worse | no difference at the maximum | ...
    reason: str  # the numbers behind the verdict, in words
    test: str
    looks: int  # reports of this trial so far, this one included
    information_fraction: float
    alpha_spent: float
    boundary: float  # the z to reach now (inf: no information yet)
    statistic: float | None  # z (shadow: McNemar's z, shown; the exact p-value decides)
    p_value: float | None  # nominal one-sided p-value at this look; compare with nominal_level
    nominal_level: float  # the p-value the boundary means at this look: Phi(-boundary)
    trial_over: bool  # promote or keep that ends the trial
    guardrails: tuple[Guardrail, ...] = ()


def decide_ab_test(
    production: ArmCounts,
    challenger: ArmCounts,
    days: float,
    plan: Plan,
    looks: int = 1,
    serving: tuple[ArmServing, ArmServing] | None = None,
) -> Decision:
    """The A/B verdict at one look: guardrails first, then the sequential test on labelled requests."""
    fraction = information_fraction(production.requests + challenger.requests, plan)
    frame = _Frame(AB_TEST, looks, fraction, plan, days, _guardrails(serving, plan))
    if (stop := frame.guardrail_stop()) is not None:
        return stop
    short = [(name, arm.requests) for name, arm in (("production", production), ("challenger", challenger))
             if arm.requests < plan.min_labelled_per_arm]  # fmt: skip
    if short:
        return frame.too_few(short)
    difference, z = difference_z(production, challenger)
    numbers = (
        f"challenger {_percent(challenger)} against production {_percent(production)} "
        f"(difference {100 * difference:+.2f} points), z = {z:.2f}"
    )
    return frame.judge(z, float(special.ndtr(-z)), numbers)


def decide_shadow(
    challenger_only: int,
    production_only: int,
    paired: int,
    days: float,
    plan: Plan,
    looks: int = 1,
    serving: tuple[ArmServing, ArmServing] | None = None,
) -> Decision:
    """The shadow verdict at one look: McNemar's exact one-sided test on the `paired` labelled requests both
    models answered, of which the challenger alone was right on `challenger_only`, production alone on
    `production_only`."""
    fraction = information_fraction(paired, plan)
    frame = _Frame(SHADOW, looks, fraction, plan, days, _guardrails(serving, plan))
    if (stop := frame.guardrail_stop()) is not None:
        return stop
    if paired < plan.min_labelled_per_arm:
        return frame.too_few([("the paired requests", paired)])
    discordant = challenger_only + production_only
    better = stats.binomtest(challenger_only, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    worse = stats.binomtest(production_only, discordant, 0.5, alternative="greater").pvalue if discordant else 1.0
    z = (challenger_only - production_only) / math.sqrt(discordant) if discordant else 0.0  # McNemar's z, shown
    numbers = (
        f"of {paired} paired requests, the challenger alone right on {challenger_only}, production alone on "
        f"{production_only}; exact one-sided p = {better:.3g} (challenger better), {worse:.3g} (worse)"
    )
    return frame.judge(z, float(better), numbers, worse_p=float(worse))


def _guardrails(serving: tuple[ArmServing, ArmServing] | None, plan: Plan) -> tuple[Guardrail, ...]:
    if serving is None:
        return ()
    production, challenger = serving
    return error_guardrail(production, challenger, plan), latency_guardrail(production, challenger, plan)


@dataclass(frozen=True)
class _Frame:
    """What every verdict of one look shares: the look, the boundary and the guardrails."""

    test: str
    looks: int
    fraction: float
    plan: Plan
    days: float
    guardrails: tuple[Guardrail, ...]

    def decision(self, verdict: Verdict, finding: str, reason: str, z: float | None = None,
                 p_value: float | None = None, over: bool = False) -> Decision:  # fmt: skip
        edge = boundary(self.fraction, self.plan)
        spent = alpha_spent(self.fraction, self.plan)
        nominal = float(special.ndtr(-edge))
        return Decision(verdict, finding, reason, self.test, self.looks, self.fraction, spent, edge, z, p_value,
                        nominal, over, self.guardrails)  # fmt: skip

    def guardrail_stop(self) -> Decision | None:
        breaches = [g for g in self.guardrails if g.breached]
        if not breaches:
            return None
        why = "; ".join(f"{g.name}: {g.detail}" for g in breaches)
        return self.decision("keep", "guardrail breached", f"trial stopped: {why}", over=True)

    def too_few(self, short: list[tuple[str, int]]) -> Decision:
        counts = ", ".join(f"{name} has {n}" for name, n in short)
        if self.days >= self.plan.max_days:
            why = f"the trial reached its {self.plan.max_days:g} days with {counts} labelled requests"
            return self.decision("keep", "too few labels by the end", why, over=True)
        why = f"{counts} of the {self.plan.min_labelled_per_arm} labelled requests needed"
        return self.decision("need_more_data", "too few labels", why)

    def judge(self, z: float, p_value: float, numbers: str, worse_p: float | None = None) -> Decision:
        edge = boundary(self.fraction, self.plan)
        nominal = float(special.ndtr(-edge))
        crossed = p_value <= nominal if worse_p is not None else z >= edge
        if crossed:
            return self.decision("promote", "challenger better", f"{numbers}: reached the boundary "
                                 f"{edge:.2f} (p <= {nominal:.3g})", z, p_value, over=True)  # fmt: skip
        sank = worse_p <= nominal if worse_p is not None else z <= -edge
        if sank:
            why = f"{numbers}: below -{edge:.2f}, the challenger is significantly worse"
            return self.decision("keep", "challenger significantly worse", why, z, p_value, over=True)
        if self.fraction >= 1.0 or self.days >= self.plan.max_days:
            end = "planned labelled requests" if self.fraction >= 1.0 else f"{self.plan.max_days:g} days"
            why = f"{numbers}: the trial reached its {end} without crossing the boundary {edge:.2f}"
            return self.decision("keep", "no significant difference by the end", why, z, p_value, over=True)
        why = f"{numbers}: below the boundary {edge:.2f} at information {self.fraction:.3f}; the trial goes on"
        return self.decision("need_more_data", "no decision yet", why, z, p_value)


def _percent(arm: ArmCounts) -> str:
    return f"{100 * arm.correct / arm.requests:.2f}% ({arm.requests} requests, {arm.clients} clients)"


def rule_text(strategy: str, plan: Plan) -> str:
    """The rule in words, for the report's metadata and Slack."""
    test = SHADOW if strategy == Strategy.shadow else AB_TEST
    return (
        f"{test}. Information t = labelled requests / {plan.max_labelled}; promote when z >= "
        f"{plan.constant:.3f} / sqrt(t) (one-sided alpha {plan.alpha} however often the report runs); keep when "
        f"z <= -{plan.constant:.3f} / sqrt(t) (significantly worse), at t = 1 or after {plan.max_days:g} days "
        f"(futility), or at once when a guardrail is breached (challenger error rate higher, always-valid mixture "
        f"SPRT at {plan.guardrail_alpha}; challenger p99 latency over {plan.latency_ratio:g}x production's); "
        f"need_more_data while an arm has fewer than {plan.min_labelled_per_arm} labelled requests or no boundary "
        "is reached"
    )
