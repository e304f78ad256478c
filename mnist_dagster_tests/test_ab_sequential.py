"""The sequential A/B decision (`lifecycle/sequential.py`) on constructed data, its level and power by
simulation, the guardrails, shadow mode's exact test, and the arm hash salted per trial."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from mnist_dagster.lifecycle.assignment import client_share
from mnist_dagster.lifecycle.sequential import (
    ArmCounts,
    ArmServing,
    Plan,
    alpha_spent,
    between_client_variance,
    boundary,
    decide_ab_test,
    decide_shadow,
    mixture_likelihood_ratio,
    rule_text,
)

PLAN = Plan()


def test_the_boundary_spends_exactly_alpha_by_the_planned_end():
    assert boundary(1.0, PLAN) == pytest.approx(stats.norm.ppf(1 - PLAN.alpha / 2))  # 1.96 at alpha 0.05
    assert alpha_spent(1.0, PLAN) == pytest.approx(PLAN.alpha)
    fractions = [0.01, 0.1, 0.25, 0.5, 1.0]
    spent = [alpha_spent(t, PLAN) for t in fractions]
    assert spent == sorted(spent) and spent[0] < 1e-6  # O'Brien-Fleming: almost nothing spent early
    assert boundary(0.0, PLAN) == math.inf and alpha_spent(0.0, PLAN) == 0.0


def test_the_continuous_boundary_holds_its_level_on_a_finely_watched_random_walk():
    """The reflection-principle boundary, written by hand, against a simulation: a null random walk
    watched at 400 looks crosses z >= c / sqrt(t) in about alpha of the paths, never much more."""
    rng = np.random.default_rng(7)
    looks, paths = 400, 20_000
    walk = np.cumsum(rng.standard_normal((paths, looks)), axis=1)
    t = np.arange(1, looks + 1) / looks
    z = walk / np.sqrt(np.arange(1, looks + 1))
    crossed = (z >= PLAN.constant / np.sqrt(t)).any(axis=1).mean()
    assert 0.035 < crossed <= PLAN.alpha + 0.005  # discrete looks: a little under alpha, approaching it


def big_trial(production_correct: int, challenger_correct: int) -> tuple[ArmCounts, ArmCounts]:
    """The planned maximum: 54,000 production and 6,000 challenger labelled requests, no client keys."""
    return ArmCounts.independent(54_000, production_correct), ArmCounts.independent(6_000, challenger_correct)


def test_a_better_challenger_is_promoted_at_the_planned_end_and_the_decision_says_how():
    production, challenger = big_trial(53_460, 5_970)  # 99.0% against 99.5%: z about 4.9
    decision = decide_ab_test(production, challenger, days=30, plan=PLAN, looks=30)
    assert (decision.verdict, decision.finding, decision.trial_over) == ("promote", "challenger better", True)
    assert decision.looks == 30 and decision.information_fraction == 1.0
    assert decision.alpha_spent == pytest.approx(0.05) and decision.boundary == pytest.approx(1.96, abs=0.01)
    assert decision.statistic > decision.boundary and decision.p_value <= decision.nominal_level
    assert "99.50% (6000 requests, 6000 clients)" in decision.reason and "O'Brien-Fleming" in decision.test


def test_the_same_lead_early_in_the_trial_is_not_enough():
    """Day 1: 1,800 against 200, the challenger perfect. A fixed test would call it (z about 1.4 ... 4),
    the early boundary (10.7 at t = 1/30) does not."""
    production, challenger = ArmCounts.independent(1_800, 1_782), ArmCounts.independent(200, 200)
    decision = decide_ab_test(production, challenger, days=1, plan=PLAN, looks=1)
    assert decision.verdict == "need_more_data" and not decision.trial_over
    assert decision.boundary == pytest.approx(PLAN.constant * math.sqrt(30), rel=1e-6)
    assert decision.statistic < decision.boundary and "the trial goes on" in decision.reason


def test_no_difference_by_the_end_keeps_production_and_a_worse_challenger_is_stopped_early():
    level = decide_ab_test(*big_trial(53_460, 5_940), days=30, plan=PLAN, looks=30)
    assert (level.verdict, level.finding, level.trial_over) == ("keep", "no significant difference by the end", True)
    production, challenger = ArmCounts.independent(13_500, 13_365), ArmCounts.independent(1_500, 1_440)  # 99% vs 96%
    worse = decide_ab_test(production, challenger, days=8, plan=PLAN, looks=8)
    assert (worse.verdict, worse.finding, worse.trial_over) == ("keep", "challenger significantly worse", True)


def test_too_few_labels_waits_and_at_the_maximum_duration_keeps():
    production, challenger = ArmCounts.independent(500, 495), ArmCounts.independent(20, 20)
    waiting = decide_ab_test(production, challenger, days=3, plan=PLAN)
    assert waiting.verdict == "need_more_data" and "challenger has 20" in waiting.reason
    ended = decide_ab_test(production, challenger, days=30, plan=PLAN)
    assert (ended.verdict, ended.finding, ended.trial_over) == ("keep", "too few labels by the end", True)


def test_clients_are_the_unit_a_lead_carried_by_three_clients_is_not_significant():
    """6,000 challenger requests from 3 clients whose own accuracies differ: counted as independent
    requests the lead is overwhelming (z about 5.6); with the clients as the unit it is not."""
    production = ArmCounts.independent(54_000, 53_460)
    as_requests = ArmCounts.independent(6_000, 5_984)
    as_clients = ArmCounts.from_clients([2_000, 2_000, 2_000], [1_990, 2_000, 1_994])
    assert as_clients.requests == as_requests.requests and as_clients.clients == 3
    assert decide_ab_test(production, as_requests, days=30, plan=PLAN).verdict == "promote"
    decision = decide_ab_test(production, as_clients, days=30, plan=PLAN)
    assert decision.verdict == "keep" and decision.statistic < 2.0
    assert "(6000 requests, 3 clients)" in decision.reason


def test_the_between_client_variance_recovers_the_spread_it_was_simulated_with():
    """600 clients of 1-200 requests, accuracies uniform on 98% +- 2 points (variance 0.04^2 / 12)."""
    rng = np.random.default_rng(9)
    sizes = rng.integers(1, 201, size=600)
    accuracy = 0.98 + rng.uniform(-0.02, 0.02, size=600)
    correct = rng.binomial(sizes, accuracy)
    arm = rng.random(600) < 0.1
    production = ArmCounts.from_clients(sizes[~arm], correct[~arm])
    challenger = ArmCounts.from_clients(sizes[arm], correct[arm])
    pooled = correct.sum() / sizes.sum()
    assert between_client_variance(production, challenger, pooled) == pytest.approx(0.04**2 / 12, rel=0.3)
    alone = ArmCounts.independent(5_000, 4_900), ArmCounts.independent(500, 490)  # one request per client
    assert between_client_variance(*alone, pooled=0.98) == 0.0


def simulate_trials(trials: int, accuracy_p: float, accuracy_c: float, seed: int) -> list[str]:
    """Trials of 30 daily looks, 2,000 labelled requests a day, share 0.1: the final verdicts."""
    rng = np.random.default_rng(seed)
    n_c = np.cumsum(rng.binomial(2_000, 0.1, size=(trials, 30)), axis=1)
    n_p = np.arange(1, 31) * 2_000 - n_c
    y_c = np.cumsum(rng.binomial(np.diff(n_c, prepend=0, axis=1), accuracy_c), axis=1)
    y_p = np.cumsum(rng.binomial(np.diff(n_p, prepend=0, axis=1), accuracy_p), axis=1)
    verdicts = []
    for trial in range(trials):
        for day in range(30):
            production = ArmCounts.independent(int(n_p[trial, day]), int(y_p[trial, day]))
            challenger = ArmCounts.independent(int(n_c[trial, day]), int(y_c[trial, day]))
            decision = decide_ab_test(production, challenger, day + 1, PLAN, day + 1)
            if decision.trial_over:
                break
        verdicts.append(decision.verdict)
    return verdicts


def test_identical_models_looked_at_daily_are_promoted_at_most_alpha_of_the_time():
    verdicts = simulate_trials(1_000, 0.98, 0.98, seed=11)
    rate = verdicts.count("promote") / len(verdicts)
    assert rate <= PLAN.alpha + 2.33 * math.sqrt(PLAN.alpha * (1 - PLAN.alpha) / 1_000)  # one-sided 99% margin


def test_a_half_point_better_challenger_is_found_within_the_trial():
    verdicts = simulate_trials(200, 0.99, 0.995, seed=12)
    assert verdicts.count("promote") / len(verdicts) >= 0.85


def test_a_challenger_erring_on_5_percent_is_stopped_by_the_guardrail_before_any_label():
    serving = ArmServing(requests=1_800, errors=9), ArmServing(requests=200, errors=10)
    no_labels = ArmCounts.independent(0, 0), ArmCounts.independent(0, 0)
    decision = decide_ab_test(*no_labels, days=0.5, plan=PLAN, looks=1, serving=serving)
    assert (decision.verdict, decision.finding, decision.trial_over) == ("keep", "guardrail breached", True)
    assert "error rate" in decision.reason and "5.00% of 200" in decision.reason
    assert [g.breached for g in decision.guardrails] == [True, False]


def test_a_slow_challenger_breaches_the_latency_guardrail_and_equal_ones_pass():
    slow = ArmServing(20_000, 10, p99_ms=40.0, timed=20_000), ArmServing(2_000, 1, p99_ms=90.0, timed=2_000)
    decision = decide_ab_test(*big_trial(53_460, 5_970), days=30, plan=PLAN, serving=slow)
    assert decision.verdict == "keep" and "p99 latency" in decision.reason  # not promoted despite its accuracy
    fine = ArmServing(20_000, 10, p99_ms=40.0, timed=20_000), ArmServing(2_000, 1, p99_ms=45.0, timed=2_000)
    assert decide_ab_test(*big_trial(53_460, 5_970), days=30, plan=PLAN, serving=fine).verdict == "promote"


def test_the_mixture_likelihood_ratio_is_the_mixture_it_claims():
    """The closed form against the integral it stands for: the normal likelihood ratio of theta against 0,
    averaged over a half-normal prior of scale s."""
    for estimate, variance, scale in [(0.01, 4e-5, 0.01), (-0.003, 1e-5, 0.005), (0.02, 1e-4, 0.01)]:
        def integrand(theta: float) -> float:
            prior = 2 * stats.norm.pdf(theta, scale=scale)
            return prior * math.exp((theta * estimate - theta * theta / 2) / variance)

        expected, _ = integrate.quad(integrand, 0, 20 * scale)
        assert mixture_likelihood_ratio(estimate, variance, scale) == pytest.approx(expected, rel=1e-6)


def test_the_error_guardrail_rarely_stops_a_challenger_that_errs_no_more():
    rng = np.random.default_rng(5)
    trials, stopped = 600, 0
    for _ in range(trials):
        n_c = np.cumsum(rng.binomial(2_000, 0.1, size=30))
        n_p = np.arange(1, 31) * 2_000 - n_c
        e_c = np.cumsum(rng.binomial(np.diff(n_c, prepend=0), 0.01))
        e_p = np.cumsum(rng.binomial(np.diff(n_p, prepend=0), 0.01))
        for day in range(30):
            serving = ArmServing(int(n_p[day]), int(e_p[day])), ArmServing(int(n_c[day]), int(e_c[day]))
            no_labels = ArmCounts.independent(0, 0), ArmCounts.independent(0, 0)
            if decide_ab_test(*no_labels, day + 1, PLAN, serving=serving).finding == "guardrail breached":
                stopped += 1
                break
    assert stopped / trials <= PLAN.guardrail_alpha + 2.33 * math.sqrt(0.05 * 0.95 / trials)


def test_shadow_mode_runs_mcnemars_exact_one_sided_test_at_the_sequential_level():
    decision = decide_shadow(challenger_only=60, production_only=20, paired=60_000, days=30, plan=PLAN)
    expected = stats.binomtest(60, 80, 0.5, alternative="greater").pvalue
    assert decision.verdict == "promote" and decision.p_value == pytest.approx(expected)
    assert "McNemar" in decision.test and decision.nominal_level == pytest.approx(0.025)
    early = decide_shadow(challenger_only=12, production_only=3, paired=4_000, days=2, plan=PLAN)
    assert early.verdict == "need_more_data"  # p = 0.018 would pass a fixed test; not at t = 1/15
    assert early.p_value < 0.05 and early.nominal_level < early.p_value
    worse = decide_shadow(challenger_only=10, production_only=70, paired=30_000, days=15, plan=PLAN)
    assert (worse.verdict, worse.finding) == ("keep", "challenger significantly worse")


def test_shadow_mode_holds_its_level_when_the_models_are_equally_good():
    rng = np.random.default_rng(3)
    trials, promoted = 600, 0
    for _ in range(trials):
        discordant = np.cumsum(rng.binomial(2_000, 0.01, size=30))  # 1% of paired requests: one model alone right
        challenger_only = np.cumsum(rng.binomial(np.diff(discordant, prepend=0), 0.5))
        for day in range(30):
            a, b = int(challenger_only[day]), int(discordant[day] - challenger_only[day])
            decision = decide_shadow(a, b, 2_000 * (day + 1), day + 1, PLAN)
            if decision.trial_over:
                promoted += decision.verdict == "promote"
                break
    assert promoted / trials <= PLAN.alpha + 2.33 * math.sqrt(0.05 * 0.95 / trials)


def test_the_arm_hash_is_sticky_within_a_trial_and_fresh_across_trials():
    share, clients = 0.1, [f"client-{i}" for i in range(20_000)]
    first = np.array([client_share(key, "trial-a") < share for key in clients])
    again = np.array([client_share(key, "trial-a") < share for key in clients])
    second = np.array([client_share(key, "trial-b") < share for key in clients])
    assert (first == again).all()  # same client, same trial: same arm, every time
    assert first.mean() == pytest.approx(share, abs=0.01) and second.mean() == pytest.approx(share, abs=0.01)
    independent = share**2 + (1 - share) ** 2  # 0.82: what two independent draws agree on
    assert (first == second).mean() == pytest.approx(independent, abs=0.01)
    assert (first & second).mean() == pytest.approx(share**2, abs=0.003)  # not the same audience again


def test_the_rule_in_words_names_the_test_the_level_and_the_boundary():
    words = rule_text("ab_test", PLAN)
    assert "one-sided" in words and "1.960 / sqrt(t)" in words and "60000" in words and "guardrail" in words
    assert "McNemar" in rule_text("shadow", PLAN)
