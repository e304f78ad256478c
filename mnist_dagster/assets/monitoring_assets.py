"""Monitoring: `prediction_drift` (the traffic since the last check, cut into windows by arm, model version
and input path, each judged against its own version's reference) with its check `no_prediction_drift`; and
`feedback_to_landing_job`, which turns labelled feedback into a labelled batch in `landing/` (its sensor is
in `sensors/ml_sensors.py`).

The statistics live in `mnist_dagster.ml.drift` and `ml.cbpe` (reached through `ml`, loaded on first use),
the windows in `lifecycle.drift_windows` and the feedback guards in `lifecycle.landing`; those two load
pandas and scipy, so each is imported in the one step that uses it and loading the code location stays fast.
"""

import json
from datetime import datetime, timezone
from typing import Any

import dagster as dg

from mnist_dagster import ml
from mnist_dagster.assets.metadata import png_markdown, table
from mnist_dagster.layout import DRIFT_CURSOR_KEY
from mnist_dagster.resources.storage import StorageResource

DRIFT_CHECK = "no_prediction_drift"
STATISTIC_COLUMNS = [
    "window", "statistic", "test", "value", "p_value", "alpha", "moderate", "severe", "severity", "reference",
    "current",
]  # fmt: skip
WINDOW_COLUMNS = [
    "window", "traffic", "severity", "estimated_accuracy", "reference_accuracy", "realised_accuracy", "reference",
]  # fmt: skip
WHY_LEVELS = (
    "ALARM (moderate/severe, drift_detected) only on harm: the accuracy estimated without labels (CBPE: mean "
    "calibrated top probability, Poisson-binomial interval) fell >= accuracy_drop_moderate (severe: "
    ">= accuracy_drop_severe) below the reference's estimate, and a one-sided Welch t-test on the confidences "
    "gives p < alpha. INFO: input statistics (class mix, confidence, ink, intensity, bounding box, centre) moved "
    "by an effect past their threshold (PSI, KS's D) with p < alpha (two-sample chi-square on bins merged to "
    "expected counts >= 5, or KS); they say what changed and alone never alarm. alpha = 0.001 per test: a "
    "clean window runs at most eight tests, so chance alone flags at most 0.8% of clean windows (Bonferroni), "
    "and an alarm needs the 1-point drop besides. Repeated runs stay valid: each prediction is judged once, in "
    "one window (the cursor moves past what was judged; a window under min_traffic waits, untested, until it "
    "has enough), so each day's tests are on fresh traffic and keep their level, with no re-testing of "
    "accumulating data. Each window is one arm, one version, one input path, against that version's reference "
    "for that path. Defaults measured by benchmarks/drift_benchmark.py (docs/monitoring-verdicts.md)."
)


class DriftConfig(dg.Config):
    """Thresholds (see `ml.drift.DriftThresholds` for the defaults' source) and how much traffic is enough."""

    min_traffic: int = 200  # a window with fewer predictions is not judged (listed as too small)
    settle_seconds: float = 120.0  # log objects named less than this ago are left for the next run
    alpha: float = 0.001
    accuracy_drop_moderate: float = 0.01  # estimated accuracy lost, as a fraction: 1 point is an alarm
    accuracy_drop_severe: float = 0.03
    class_psi: float = 0.1
    feature_psi: float = 0.1
    confidence_ks: float = 0.1
    max_wait_days: float = 7.0  # a window below min_traffic waits this long for more, then is let go
    accept_reference: bool = False  # the operator accepts this traffic as normal: it becomes the reference

    def thresholds(self) -> "ml.drift.DriftThresholds":
        return ml.drift.DriftThresholds(
            alpha=self.alpha,
            accuracy_drop=(self.accuracy_drop_moderate, self.accuracy_drop_severe),
            class_psi=self.class_psi,
            feature_psi=self.feature_psi,
            confidence_ks=self.confidence_ks,
        )


@dg.asset(
    group_name="monitoring",
    kinds={"scipy"},
    deps=["production_digit_classifier", "batch_digit_predictions"],  # judged after a deployment and the batch
    check_specs=[
        dg.AssetCheckSpec(
            DRIFT_CHECK,
            asset="prediction_drift",
            description=(
                "WARN on a moderate alarm (estimated accuracy down >= 1 point), ERROR on severe (>= 3 points); "
                "input changes alone are info and pass (prediction_drift's tables say what moved, per window)."
            ),
        )
    ],
    description="Judges the traffic since the last run (endpoint log and batch tables), per arm, model version "
    "and input path, against that version's reference: alarms when the accuracy estimated from calibrated "
    "confidences falls; input statistics say what changed. With accept_reference, the traffic becomes the "
    "reference instead. Quick and successful when there is no traffic.",
)
def prediction_drift(
    context: dg.AssetExecutionContext, config: DriftConfig, storage: StorageResource
) -> dg.MaterializeResult:
    # pandas and scipy (seconds to import) only when the step runs: kept off the code location's load
    from mnist_dagster.lifecycle import drift_windows

    store = storage.open()
    now = datetime.now(timezone.utc)
    windows, read_to = drift_windows.read_windows(store, drift_windows.read_cursor(store), config.settle_seconds)
    big = [w for w in windows if len(w) >= config.min_traffic]
    count = sum(len(w) for w in windows)
    if not big:  # the cursor stays: all of it waits for the next run
        return _nothing_judged(
            f"{count} new predictions, no window (arm/version/input) with min_traffic={config.min_traffic}: "
            "they are judged with the next run's", count,
        )  # fmt: skip
    small = [w for w in windows if len(w) < config.min_traffic]
    let_go = [w for w in small if drift_windows.waited_too_long(w, now, config.max_wait_days)]
    waiting = [w for w in small if w not in let_go]
    unjudged = [f"{w.name}: {len(w)} predictions, fewer than min_traffic: kept for the next run" for w in waiting]
    unjudged += [f"{w.name}: {len(w)} predictions after waiting {config.max_wait_days} days since "
                 f"{w.waiting_since}: let go unjudged" for w in let_go]  # fmt: skip
    if config.accept_reference:
        replaced = drift_windows.accept_as_reference(store, big, f"run {context.run_id[:8]}")
        result = _nothing_judged(f"accepted as the reference: {', '.join(replaced)}", count)
    else:
        labels = drift_windows.feedback_labels(store)
        verdicts = []
        for window in big:
            reference = drift_windows.read_reference(store, window.version)
            if reference is None:
                unjudged.append(f"{window.name}: no drift reference for version {window.version} (none saved, or "
                                "one of an older format: deploy it again, or accept a window as its reference)")
                continue
            verdicts.append(drift_windows.judge(window, reference, config.thresholds(), labels))
        result = _judged(verdicts, unjudged, config)
    cursor = drift_windows.next_cursor(read_to, waiting, now)
    store.write_bytes(DRIFT_CURSOR_KEY, json.dumps(cursor).encode())  # last: a failed run re-reads
    context.log.info(result.metadata["summary"])
    return result


def _nothing_judged(why: str, count: int) -> dg.MaterializeResult:
    """A quick success that says why nothing was judged."""
    metadata = {"drift_detected": False, "severity": "none", "traffic": count, "summary": why, "model_version": ""}
    check = dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=True, description=why, metadata={"traffic": count})
    return dg.MaterializeResult(metadata=metadata, check_results=[check])


def _judged(verdicts: list, unjudged: list[str], config: DriftConfig) -> dg.MaterializeResult:
    """The windows' verdicts as the asset's metadata and its check: the worst severity decides."""
    worst = max(verdicts, key=lambda v: ml.drift.SEVERITY_ORDER[v.report.severity], default=None)
    severity = worst.report.severity if worst else "none"
    detected = any(v.report.drift_detected for v in verdicts)
    moved = [(v.window.name, s) for v in verdicts for s in v.report.moved()]
    summary = _summary(verdicts, unjudged)
    metadata = {
        "drift_detected": detected,
        "severity": severity,
        "traffic": sum(v.report.traffic for v in verdicts),
        "model_version": worst.window.version if worst else "",
        "worst_window": worst.window.name if worst else "",  # arm/version/input path
        "summary": summary,
        "windows": table([_window_row(v) for v in verdicts], WINDOW_COLUMNS),
        "not_judged": dg.MetadataValue.json(unjudged),
        "moved": dg.MetadataValue.json([_row(name, s) for name, s in moved]),
        "statistics": table([_row(v.window.name, s) for v in verdicts for s in v.report.statistics], STATISTIC_COLUMNS),
        "thresholds": dg.MetadataValue.json({**config.model_dump(), "why": WHY_LEVELS}),
        "histograms": png_markdown(
            ml.plots.drift_histograms_png(worst.report.histograms, [s.name for s in worst.report.moved()]),
            f"reference vs current ({worst.window.name})",
        ) if worst else "",
    }  # fmt: skip
    check = dg.AssetCheckResult(
        check_name=DRIFT_CHECK,
        passed=not detected,
        severity=dg.AssetCheckSeverity.ERROR if severity == "severe" else dg.AssetCheckSeverity.WARN,
        description=summary,
        metadata={"severity": severity, "traffic": metadata["traffic"],
                  "moved": dg.MetadataValue.json([f"{name}:{s.name}" for name, s in moved])},
    )  # fmt: skip
    return dg.MaterializeResult(metadata=metadata, check_results=[check])


def _summary(verdicts: list, unjudged: list[str]) -> str:
    parts = []
    for verdict in verdicts:
        report, name = verdict.report, verdict.window.name
        moved = report.moved()
        head = (
            f"{report.severity if moved else 'no'} drift in {name} ({report.traffic} predictions, estimated "
            f"accuracy {report.estimate.accuracy:.2%} vs {report.reference_accuracy:.2%})"
        )
        parts.append(head + (": " + "; ".join(_moved_text(s) for s in moved) if moved else ""))
    return " | ".join(parts + [f"not judged: {u}" for u in unjudged])


def _window_row(verdict) -> dict[str, Any]:
    report = verdict.report
    return {
        "window": verdict.window.name, "traffic": report.traffic, "severity": report.severity,
        "estimated_accuracy": report.estimate.text(), "reference_accuracy": f"{report.reference_accuracy:.2%}",
        "realised_accuracy": verdict.realised.text() if verdict.realised else "no labels",
        "reference": verdict.reference_source,
    }  # fmt: skip


def _row(window: str, statistic) -> dict[str, Any]:
    return {
        "window": window, "statistic": statistic.name, "test": statistic.test, "value": round(statistic.value, 4),
        "p_value": float(f"{statistic.p_value:.3g}"), "alpha": statistic.alpha, "moderate": statistic.moderate, "severe": statistic.severe,
        "severity": statistic.severity, "reference": statistic.reference, "current": statistic.current,
    }  # fmt: skip


def _moved_text(statistic) -> str:
    """`mean_ink: mean 0.13 -> mean 0.25 (0.62 >= 0.1, info)`."""
    limit = statistic.severe if statistic.severity == "severe" else statistic.moderate
    return (
        f"{statistic.name} {statistic.reference} -> {statistic.current} "
        f"({statistic.value:.3f} >= {limit}, {statistic.severity})"
    )


# ----- feedback -> landing ---------------------------------------------------------------------------

FEEDBACK_QUARANTINE = dg.AssetKey("feedback_quarantine")  # what the op reports when it holds labels back
VERDICT_COLUMNS = ["client", "labels", "share", "disagreement", "others", "p_value", "verdict"]
CLIENTS_SHOWN = 100  # the largest clients of a batch in the op's table (the page makes one client per browser)


class FeedbackLandingConfig(dg.Config):
    """When labels land, and when a client's labels are quarantined instead. The defaults are
    `lifecycle.landing.GuardRules`'s (a test holds them equal; that module is not imported at load: it loads
    scipy and the endpoint's modules)."""

    min_feedback: int = 100  # new labels needed before a batch is written (the sensor passes MNIST_MIN_FEEDBACK)
    max_age_days: int = 30  # how far before the earliest new feedback the prediction log is searched for images
    max_share: float = 0.2  # a client sending more of the batch is quarantined ...
    min_clients_for_share: int = 10  # ... once the batch has this many clients
    alpha: float = 0.001  # the disagreement test's family-wise level (Bonferroni over the clients tested)
    min_excess: float = 0.10  # and the client's disagreement rate must exceed the others' by this much
    min_labels: int = 30  # a client is tested from this many labels ...
    min_peer_labels: int = 30  # ... against at least this many of other clients (else held; 0: land untested)

    def rule_values(self) -> dict[str, float]:
        """The guard's settings, as `lifecycle.landing.GuardRules` takes them."""
        names = ("max_share", "min_clients_for_share", "alpha", "min_excess", "min_labels", "min_peer_labels")
        return {name: getattr(self, name) for name in names}


@dg.op(
    out=dg.Out(dg.Nothing),
    description="Writes the new labelled feedback, with the images the prediction log kept, as one batch in "
    "landing/ (once each prediction, the latest label), when at least min_feedback new labels exist; a client "
    "sending too large a share, or disagreeing with the model far more than the others, goes to quarantine/.",
)
def land_feedback(context: dg.OpExecutionContext, config: FeedbackLandingConfig, storage: StorageResource):
    # scipy (seconds to import) only when the op runs: kept off the code location's load
    from mnist_dagster.lifecycle import landing

    rules = landing.GuardRules(**config.rule_values())
    result = landing.land_feedback(storage.open(), config.min_feedback, config.max_age_days, rules)
    context.log.info(result.summary())
    if result.late_corrections:
        context.log.warning(
            f"{result.late_corrections} label(s) were corrected after their prediction had landed: the landed "
            "label stays (a prediction lands once)"
        )
    selection = result.selection
    quarantined = [verdict.row() for verdict in selection.quarantined_clients()] if selection else []
    guard = {
        "quarantined": result.quarantined,
        "quarantine_key": result.quarantine_key or "",
        "quarantined_clients": dg.MetadataValue.json(quarantined),
        "held": result.held,
        "test": landing.TEST_NAME,
        "rule": rules.test_statement(),
        "rules": dg.MetadataValue.json(landing.rules_metadata(rules, selection)),
    }
    if selection is not None:
        guard["clients"] = table(landing.verdict_rows(selection)[:CLIENTS_SHOWN], VERDICT_COLUMNS)
        guard["client_count"] = len(selection.verdicts)
    if result.quarantined:
        context.log.warning(result.summary())
        yield dg.AssetMaterialization(
            FEEDBACK_QUARANTINE,
            description=f"{result.quarantined} label(s) held back from landing/ as likely poisoning",
            metadata={**guard, "landed": result.landed},
        )
    yield dg.Output(
        None,
        metadata={
            "landing_key": result.key or "",
            "landed": result.landed,
            "unmatched": result.unmatched,
            "pending": result.pending,
            "late_corrections": result.late_corrections,
            "min_feedback": config.min_feedback,
            **guard,
        },
    )
