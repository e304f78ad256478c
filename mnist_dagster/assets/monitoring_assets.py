"""Monitoring: `prediction_drift` (what the production model saw since the last check, against the reference
saved when it was deployed) with its check `no_prediction_drift`; and `feedback_to_landing_job`, which turns
labelled feedback into a labelled batch in `landing/` (its sensor is in `sensors/ml_sensors.py`).

The statistics live in `mnist_dagster.ml.drift`, the log formats in `mnist_dagster.serving`; numpy, scipy and
pandas are imported inside the bodies so loading the code location stays fast.
"""

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import dagster as dg

from mnist_dagster.assets.metadata import png_markdown, table
from mnist_dagster.layout import DRIFT_CURSOR_KEY, SCORED_PREFIX, drift_reference_key
from mnist_dagster.lifecycle.record import read_record
from mnist_dagster.resources.storage import StorageResource
from mnist_dagster.storage import Store

DRIFT_CHECK = "no_prediction_drift"
STATISTIC_COLUMNS = ["statistic", "test", "value", "p_value", "moderate", "severe", "severity", "reference", "current"]
WHY_THRESHOLDS = (
    "A statistic alarms when its effect size passes the threshold AND its test gives p < alpha. Defaults "
    "measured on real MNIST (benchmarks/drift_benchmark.py, see the README): ten chunks of the clean test set "
    "stay below every moderate threshold; 45-degree rotation, heavy noise, thick or thin strokes pass a severe one."
)


class DriftConfig(dg.Config):
    """Thresholds (see `ml.drift.DriftThresholds` for the defaults' source) and how much traffic is enough."""

    min_traffic: int = 200  # fewer new predictions are not judged: they wait for the next run
    settle_seconds: float = 120.0  # log objects named less than this ago are left for the next run
    alpha: float = 0.001
    class_psi_moderate: float = 0.1
    class_psi_severe: float = 0.25
    feature_psi_moderate: float = 0.35
    feature_psi_severe: float = 0.7
    confidence_ks_moderate: float = 0.15
    confidence_ks_severe: float = 0.3
    low_confidence: float = 0.5
    low_confidence_rise_moderate: float = 0.05
    low_confidence_rise_severe: float = 0.15

    def thresholds(self):
        from mnist_dagster.ml.drift import DriftThresholds

        return DriftThresholds(
            alpha=self.alpha,
            class_psi=(self.class_psi_moderate, self.class_psi_severe),
            feature_psi=(self.feature_psi_moderate, self.feature_psi_severe),
            confidence_ks=(self.confidence_ks_moderate, self.confidence_ks_severe),
            low_confidence=self.low_confidence,
            low_confidence_rise=(self.low_confidence_rise_moderate, self.low_confidence_rise_severe),
        )


# ----- the traffic since the last run ------------------------------------------------------------------


def read_cursor(store: Store) -> dict[str, Any]:
    """{"log_after": the last prediction-log object judged, "batch_tables": the batch tables judged}."""
    if not store.exists(DRIFT_CURSOR_KEY):
        return {"log_after": "", "batch_tables": []}
    return json.loads(store.read_bytes(DRIFT_CURSOR_KEY))


def read_traffic(store: Store, cursor: dict[str, Any], version: str, settle_seconds: float) -> dict[str, Any]:
    """What `version` answered since `cursor`: endpoint predictions (with images) and batch rows (without:
    the batch tables keep digit and confidence only). Returns the arrays and the cursor to save once judged.
    Lines of other versions (a challenger, the model before a deployment) are passed over: the reference
    belongs to this version."""
    import numpy as np

    from mnist_dagster.serving.prediction_log import decode_images, log_objects_after, object_stamp

    settled = datetime.now(timezone.utc) - timedelta(seconds=settle_seconds)
    objects = log_objects_after(store, cursor.get("log_after", ""), settled)
    lines = [
        line
        for item in objects
        for raw in store.read_bytes(item.key).splitlines()
        if raw.strip() and (line := json.loads(raw)).get("model_version") == version
    ]
    seen = set(cursor.get("batch_tables", []))
    tables = [item.key for item in store.list(SCORED_PREFIX) if item.key.endswith(".parquet") and item.key not in seen]
    batch_digits, batch_confidences = _batch_rows(store, tables, version)
    return {
        "digits": np.concatenate([np.array([line["digit"] for line in lines], dtype=np.int64), batch_digits]),
        "confidences": np.concatenate(
            [np.array([line["confidence"] for line in lines], dtype=float), batch_confidences]
        ),
        "images": decode_images([line["image"] for line in lines if "image" in line]),
        "endpoint": len(lines),
        "batch": len(batch_digits),
        "next_cursor": {
            "log_after": object_stamp(objects[-1].key) if objects else cursor.get("log_after", ""),
            "batch_tables": sorted(seen | set(tables)),
        },
    }


def _batch_rows(store: Store, keys: list[str], version: str) -> tuple[Any, Any]:
    """Digits and confidences (numpy arrays) of `version`'s rows in the nightly batch's Parquet tables: other
    versions' answers say nothing about the production model's reference."""
    import io

    import numpy as np
    import pandas as pd

    columns = ["digit", "confidence", "model_version"]
    frames = [pd.read_parquet(io.BytesIO(store.read_bytes(key)), columns=columns) for key in keys]
    rows = pd.concat(frames) if frames else pd.DataFrame({"digit": [], "confidence": [], "model_version": []})
    rows = rows[rows["model_version"].astype(str) == version]
    return rows["digit"].to_numpy(np.int64), rows["confidence"].to_numpy(float)


# ----- the asset ---------------------------------------------------------------------------------------


@dg.asset(
    group_name="monitoring",
    kinds={"scipy"},
    deps=["production_digit_classifier", "batch_digit_predictions"],  # judged after a deployment and the batch
    check_specs=[
        dg.AssetCheckSpec(
            DRIFT_CHECK,
            asset="prediction_drift",
            description=(
                "WARN on moderate drift, ERROR on severe: the traffic since the last run against the production "
                "model's reference (prediction_drift's table says which statistic moved)."
            ),
        )
    ],
    description="Compares what the production model saw since the last run (endpoint log and batch tables) "
    "with the reference saved when it was deployed: predicted classes, confidences, low-confidence rate, "
    "image features. Quick and successful when there is no traffic.",
)
def prediction_drift(
    context: dg.AssetExecutionContext, config: DriftConfig, storage: StorageResource
) -> dg.MaterializeResult:
    store = storage.open()
    version = read_record(store).production
    if version is None:
        return _nothing_judged("no production model yet: nothing to compare", None, 0)
    if not store.exists(drift_reference_key(version)):
        return _nothing_judged(
            f"no drift reference for production version {version} (deployed before monitoring?)", version, 0
        )
    cursor = read_cursor(store)
    traffic = read_traffic(store, cursor, version, config.settle_seconds)
    count = len(traffic["digits"])
    if count < config.min_traffic:
        return _nothing_judged(
            f"{count} new predictions by version {version}, fewer than min_traffic={config.min_traffic}: "
            "they are judged with the next run's", version, count,
        )  # fmt: skip
    result = _judge(store, version, traffic, config)
    store.write_bytes(DRIFT_CURSOR_KEY, json.dumps(traffic["next_cursor"]).encode())  # last: a failed run re-reads
    context.log.info(result.metadata["summary"])
    return result


def _nothing_judged(why: str, version: str | None, count: int) -> dg.MaterializeResult:
    """A quick success that says why nothing was judged; the cursor stays, so the traffic waits."""
    metadata = {
        "drift_detected": False,
        "severity": "none",
        "traffic": count,
        "summary": why,
        "model_version": version or "",
    }
    check = dg.AssetCheckResult(check_name=DRIFT_CHECK, passed=True, description=why, metadata={"traffic": count})
    return dg.MaterializeResult(metadata=metadata, check_results=[check])


def _judge(store: Store, version: str, traffic: dict[str, Any], config: DriftConfig) -> dg.MaterializeResult:
    from mnist_dagster.ml import drift, plots

    reference = drift.DriftReference.from_json(store.read_bytes(drift_reference_key(version)))
    images = traffic["images"] if len(traffic["images"]) else None
    report = drift.compare(reference, traffic["digits"], traffic["confidences"], images, config.thresholds())
    moved = report.moved()
    rows = [_row(statistic) for statistic in report.statistics]
    summary = (
        f"{report.severity} drift in {report.traffic} predictions by version {version}: "
        + "; ".join(_moved_text(s) for s in moved)
        if moved
        else f"no drift in {report.traffic} predictions by version {version}"
    )
    metadata = {
        "drift_detected": report.drift_detected,
        "severity": report.severity,
        "traffic": report.traffic,
        "traffic_endpoint": traffic["endpoint"],
        "traffic_batch": traffic["batch"],
        "traffic_with_images": report.images,
        "model_version": version,
        "summary": summary,
        "moved": dg.MetadataValue.json([_row(s) for s in moved]),
        "statistics": table(rows, STATISTIC_COLUMNS),
        "thresholds": dg.MetadataValue.json({**config.model_dump(), "why": WHY_THRESHOLDS}),
        "histograms": png_markdown(
            plots.drift_histograms_png(report.histograms, [s.name for s in moved]), "reference vs current"
        ),
    }
    check = dg.AssetCheckResult(
        check_name=DRIFT_CHECK,
        passed=not report.drift_detected,
        severity=dg.AssetCheckSeverity.ERROR if report.severity == "severe" else dg.AssetCheckSeverity.WARN,
        description=summary,
        metadata={"severity": report.severity, "traffic": report.traffic,
                  "moved": dg.MetadataValue.json([s.name for s in moved])},
    )  # fmt: skip
    return dg.MaterializeResult(metadata=metadata, check_results=[check])


def _row(statistic) -> dict[str, Any]:
    return {
        "statistic": statistic.name, "test": statistic.test, "value": round(statistic.value, 4),
        "p_value": float(f"{statistic.p_value:.3g}"), "moderate": statistic.moderate, "severe": statistic.severe,
        "severity": statistic.severity, "reference": statistic.reference, "current": statistic.current,
    }  # fmt: skip


def _moved_text(statistic) -> str:
    """`mean_ink: mean 0.13 -> mean 0.25 (PSI + chi-square ..., 0.62 >= 0.25, severe)`."""
    limit = statistic.severe if statistic.severity == "severe" else statistic.moderate
    return (
        f"{statistic.name} {statistic.reference} -> {statistic.current} "
        f"({statistic.value:.3f} >= {limit}, {statistic.severity})"
    )


# ----- feedback -> landing ---------------------------------------------------------------------------


class FeedbackLandingConfig(dg.Config):
    min_feedback: int = 100  # new labels needed before a batch is written (the sensor passes MNIST_MIN_FEEDBACK)
    max_age_days: int = 30  # how far before the earliest new feedback the prediction log is searched for images


@dg.op(
    out=dg.Out(dg.Nothing),
    description="Writes the new labelled feedback, with the images the prediction log kept, as one batch in "
    "landing/ (once each prediction, the latest label), when at least min_feedback new labels exist.",
)
def land_feedback(context: dg.OpExecutionContext, config: FeedbackLandingConfig, storage: StorageResource):
    from mnist_dagster.serving import feedback

    result = feedback.land_feedback(storage.open(), config.min_feedback, config.max_age_days)
    context.log.info(result.summary())
    if result.late_corrections:
        context.log.warning(
            f"{result.late_corrections} label(s) were corrected after their prediction had landed: the landed "
            "label stays (a prediction lands once)"
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
        },
    )
