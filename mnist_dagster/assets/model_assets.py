"""The model: train a CNN, evaluate it on the test set, deploy it only past the accuracy gate.

Each training is one MLflow run: params, per-epoch metrics, curves, the model, then the test metrics.
"""

import json
from typing import Optional

import dagster as dg
from pydantic import Field

from mnist_dagster import ml
from mnist_dagster.assets.automation import RETRAIN_ON_NEW_DATA, TRANSIENT_IO_RETRY
from mnist_dagster.assets.config import TrainingConfig, training_config
from mnist_dagster.assets.metadata import png_markdown, table
from mnist_dagster.assets.training import train_and_record
from mnist_dagster.layout import bundle_prefix, drift_reference_key
from mnist_dagster.lifecycle import check, deploy
from mnist_dagster.lifecycle.record import Routing, Strategy, read_record
from mnist_dagster.scoring import bundle
from mnist_dagster.resources.compute import GPU_TRAINING_POD, ComputeResource
from mnist_dagster.resources.mlflow import (
    CHALLENGER_ALIAS,
    PRODUCTION_ALIAS,
    REOPENED_BY_TAG,
    STARTED_BY_TAG,
    MlflowTracking,
)
from mnist_dagster.resources.storage import StorageResource


@dg.asset(
    group_name="model",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    pool="training",  # one training at a time per GPU/laptop (limit set in dagster.yaml)
    op_tags={"dagster-k8s/config": GPU_TRAINING_POD},
    automation_condition=RETRAIN_ON_NEW_DATA,
)
def digit_classifier(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    processed_mnist_data: dict,
    compute: ComputeResource,
    mlflow: MlflowTracking,
) -> dg.Output:
    """The digit classifier: the candidate `config` names (cnn-fast by default: a small CNN) trained with
    AdamW and a one-cycle schedule, exported once to ONNX, and recorded as one MLflow run with the data
    it saw."""
    settings = training_config(config)
    record = train_and_record(
        context.log, processed_mnist_data, settings, compute, mlflow,
        run_name=f"train-{context.run_id[:8]}", tags={STARTED_BY_TAG: context.run_id},
        params={"candidate": config.candidate},
    )  # fmt: skip
    history = record.trained.history
    return dg.Output(
        record.stored_value(),
        metadata={
            "val_accuracy": history[-1].val_accuracy,
            "candidate": config.candidate,
            "architecture": settings.architecture,
            "augmentation": settings.augmentation,
            "epochs": settings.epochs,
            "training_seconds": round(record.trained.seconds, 2),
            "parameters": record.trained.parameters,
            "device": compute.resolve_device(),
            "train_loss": dg.MetadataValue.json([round(h.train_loss, 5) for h in history]),
            "training_curve": png_markdown(record.curve_png, "training curve"),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(record.run_id)),
            "mlflow_run_id": record.run_id,
        },
    )


class EvaluationConfig(dg.Config):
    metrics: Optional[list[str]] = Field(  # noqa: UP045 (Dagster config reads Optional)
        None,
        description="Metrics beyond accuracy to run, by their function names in ml/evaluate.py; "
        "unset: every default one (calibration, robustness, confused_pairs).",
    )
    seed: int = Field(0, description="Seeds the robustness perturbations: same seed, same table.")


@dg.asset(
    group_name="model",
    kinds={"pytorch", "mlflow"},
    code_version="2",
    automation_condition=RETRAIN_ON_NEW_DATA,
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    digit_classifier: dict,
    processed_mnist_data: dict,
    compute: ComputeResource,
    mlflow: MlflowTracking,
    storage: StorageResource,
) -> dg.Output:
    """The trained model on the 10k held-out test images: accuracy, per-class scores, confusion matrix, the
    metrics beyond accuracy `config.metrics` names (calibration, robustness, the top confused pairs), and
    the same images through the production model, for the gate's paired comparison."""
    device = compute.resolve_device()
    model, _ = ml.model.load_checkpoint(digit_classifier, device)
    split = ml.data.NormalisedSplit.from_dict(processed_mnist_data)
    images, labels = split.test_images, split.test_labels
    # One batched pass over the test set and all its perturbations, through the ONNX graph as it will
    # serve (with its temperature); every metric below, and the comparison with production, reads from it.
    candidate = bundle.Predictor(bundle.make_bundle("candidate", digit_classifier["onnx"]))
    result, scored = ml.evaluate.score_in_one_pass(
        model, images, labels, split.mean, split.std, device, config.seed,
        temperature=float(digit_classifier.get("temperature", 1.0)),  # absent: an uncalibrated checkpoint
        served=candidate.predict_proba,
    )  # fmt: skip
    confusion_png = ml.plots.confusion_matrix_png(result.confusion)
    worst = result.misclassified(labels)[:24]
    mistakes_png = ml.plots.digit_grid_png(
        images[worst], [f"{int(labels[i])}->{int(result.predictions[i])}" for i in worst.tolist()]
    )
    per_class = [
        {"digit": digit, "precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}
        for digit, (p, r, f) in enumerate(zip(result.precision, result.recall, result.f1, strict=True))
    ]
    metrics = ml.evaluate.run_metrics(scored, config.metrics)
    reference = _drift_reference(split, candidate)
    comparison = _compare_with_production(storage, result.predictions.numpy(), scored.pixels().numpy(), labels.numpy())
    run_id = digit_classifier["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):  # reopened by this Dagster run: if it dies, the orphan sensor closes it
        mlflow.set_tag(REOPENED_BY_TAG, context.run_id)
        mlflow.log_metrics(
            {"test_accuracy": result.accuracy, **{f"test_f1_digit_{row['digit']}": row["f1"] for row in per_class},
             **{key: value for m in metrics.values() for key, value in m.scalars.items()}}
        )  # fmt: skip
        mlflow.log_files(run_id, {"confusion_matrix.png": confusion_png, "misclassified.png": mistakes_png,
                                  **_metric_artifacts(metrics)})  # fmt: skip
    context.log.info(f"test accuracy {result.accuracy:.4f} on {len(labels)} images")
    return dg.Output(
        {
            "test_accuracy": result.accuracy,
            "confusion_matrix": result.confusion,
            "per_class": per_class,
            "mlflow_run_id": run_id,
            "comparison": comparison,
            "drift_reference": reference,
            **_serving_check_images(split),
        },
        metadata={
            "test_accuracy": result.accuracy,
            "compared_with_production": dg.MetadataValue.json(comparison or {"production": "none yet"}),
            "test_images": len(labels),
            "misclassified": int((result.predictions != labels).sum()),
            "per_class": table(per_class, ["digit", "precision", "recall", "f1"]),
            "confusion_matrix": png_markdown(confusion_png, "confusion matrix"),
            "misclassified_digits": png_markdown(mistakes_png, "misclassified digits (true->predicted)"),
            **_metrics_metadata(metrics),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        },
    )


def _drift_reference(split: "ml.data.NormalisedSplit", candidate: bundle.Predictor) -> bytes:
    """What `prediction_drift` compares this model's traffic with: held-out test digits as serving sees them
    (28x28 pixels, and rendered as PNG uploads through the upload recipe), scored by the ONNX graph the
    endpoint serves; JSON, saved beside the model when it is deployed (`ml.drift.DriftReference`)."""
    # scipy (seconds to import, through ml.drift) only when an evaluation runs: kept off the code location's load
    from mnist_dagster.lifecycle.reference import build_serving_reference

    return build_serving_reference(candidate, split.test_digits().numpy()).to_json()


def _serving_check_images(split: "ml.data.NormalisedSplit", count: int = 1000) -> dict:
    """Held-out test images as uint8 (the way they were stored), for the gate's serving-path check."""
    return {"check_images": split.test_digits()[:count].clone(), "check_labels": split.test_labels[:count].clone()}


def _metric_artifacts(metrics: dict) -> dict[str, bytes]:
    """Each metric's table as `<name>.json` and its figure as `<name>.png`, for one upload with the others."""
    files: dict[str, bytes] = {}
    for name, result in metrics.items():
        if result.table or result.columns:
            files[f"{name}.json"] = json.dumps({"summary": result.summary, "rows": result.table}, indent=2).encode()
        if result.png:
            files[f"{name}.png"] = result.png
    return files


def _metrics_metadata(metrics: dict) -> dict:
    """Each metric in the UI: its numbers, its table under its name, its figure, and what it tested."""
    metadata: dict = {}
    for name, result in metrics.items():
        metadata.update({key: float(value) for key, value in result.scalars.items()})
        if result.table or result.columns:
            metadata[name] = table(result.table, list(result.columns or result.table[0]))
        if result.png:
            metadata[f"{name}_plot"] = png_markdown(result.png, name)
        if result.summary:
            metadata[f"{name}_method"] = dg.MetadataValue.text(result.summary)
    return metadata


def _compare_with_production(storage: StorageResource, candidate_predictions, pixels, labels) -> dict | None:
    """Candidate and production, both as they serve (ONNX), on the same test pixels: McNemar's counts.
    The candidate's answers come from evaluation's one pass through its ONNX graph (on `pixels`, float32
    (N, 1, 28, 28) in [0, 1]); production's are scored here on the very same pixels."""
    production = deploy.production_bundle(storage.open())
    if production is None:
        return None
    production_predictions = bundle.Predictor(production).predict_proba(pixels).argmax(1)
    result = ml.compare.mcnemar_exact(labels, candidate_predictions, production_predictions)
    return {
        "production_version": production.version,
        "production_test_accuracy": result.production_accuracy,
        "candidate_test_accuracy": result.candidate_accuracy,
        "candidate_right_production_wrong": result.candidate_only,
        "production_right_candidate_wrong": result.production_only,
        "mcnemar_p_value": result.p_value,
        "test": ml.compare.MCNEMAR_ONE_SIDED,
    }


class DeploymentConfig(dg.Config):
    accuracy_threshold: float = 0.95  # deploy only if test accuracy is strictly above this
    alpha: float = 0.05  # refuse a candidate significantly worse than production at this level (one-sided McNemar)
    strategy: Strategy = Strategy.replace  # how a candidate that passes is deployed
    challenger_traffic: float = Field(0.1, ge=0.0, le=1.0)  # ab_test: the share of requests the challenger answers
    probability_tolerance: float = 1e-4  # serving-path check: allowed gap between served and model probabilities


@dg.asset(
    group_name="model",
    kinds={"onnx", "mlflow"},
    code_version="2",
    automation_condition=RETRAIN_ON_NEW_DATA,
    retry_policy=TRANSIENT_IO_RETRY,  # registry and S3 writes; a refusal succeeds, so it is never retried
)
def production_digit_classifier(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    digit_classifier: dict,
    model_evaluation: dict,
    storage: StorageResource,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    """The model every prediction path uses, changed only by a candidate that passes the gate.

    The gate: test accuracy above `accuracy_threshold`, not significantly worse than the production
    model on the same 10k test images (McNemar's exact test, one-sided, at `alpha`; the first model needs only the
    threshold), and the serving-path check: held-out images sent the way clients send them must get the
    model's own answers. A refusal is a successful run that says why; production stays. A candidate that
    passes becomes a new registry version and, by `strategy`, production (`replace`: the bundle first, the
    deployment record flipped last, then the `production` alias) or the challenger beside it (`ab_test`,
    `shadow`: alias `challenger`). A candidate failing the serving-path check fails the step, and neither
    the record nor the registry aliases change.
    """
    from mnist_dagster.lifecycle import gate  # its McNemar test loads scipy.stats (~1.6 s): kept off the load

    store = storage.open()
    accuracy, comparison = model_evaluation["test_accuracy"], model_evaluation.get("comparison")
    previous = read_record(store).production
    run_id = digit_classifier["mlflow_run_id"]
    common = {
        "test_accuracy": accuracy, "threshold": config.accuracy_threshold, "alpha": config.alpha,
        "mlflow_run_id": run_id, **gate.comparison_metadata(comparison),
    }  # fmt: skip
    refusal = gate.refusal(accuracy, comparison, previous, config.accuracy_threshold, config.alpha)
    if refusal is not None:
        context.log.warning(f"Not deployed: {refusal}; production stays at version {previous}")
        return dg.MaterializeResult(
            metadata={**common, "deployed": False, "decision": "refused", "reason": refusal, "model_version": previous or "none"},
            data_version=dg.DataVersion(previous or "none"),
        )
    path = _check_serving_path(digit_classifier["onnx"], model_evaluation, config)
    version = mlflow.register_version(digit_classifier["mlflow_model_uri"], run_id)
    candidate = bundle.make_bundle(
        version, digit_classifier["onnx"], test_accuracy=accuracy, mlflow_run_id=run_id, dagster_run_id=context.run_id
    )
    _save_drift_reference(store, version, model_evaluation, context.log)
    decision, served, where = _deploy(store, candidate, previous, config, mlflow, context.run_id)
    reason = gate.passed(accuracy, comparison, config.accuracy_threshold, config.alpha)
    context.log.info(f"Version {version} deployed as {decision}: {reason}")
    return dg.MaterializeResult(
        metadata={
            **common,
            "deployed": True,
            "decision": decision,
            "reason": reason,
            "strategy": str(config.strategy) if previous is not None else "replace (no production model yet)",
            "model_version": version,
            "previous_version": previous or "none",
            "registered_model": mlflow.registered_model_name,
            "bundle": dg.MetadataValue.path(store.uri(where)),
            **_serving_path_metadata(path),
        },
        data_version=dg.DataVersion(served),
    )


def _check_serving_path(onnx: bytes, evaluation: dict, config: DeploymentConfig) -> check.PathCheck | None:
    """Held-out images through the upload recipe must get the model's own answers, before anything flips."""
    if "check_images" not in evaluation:  # an evaluation stored before the check moved into the gate
        raise dg.Failure("model_evaluation has no serving-check images: materialize model_evaluation again")
    predictor = bundle.Predictor(bundle.make_bundle("candidate", onnx))
    try:
        return check.check_serving_path(
            predictor, evaluation["check_images"].numpy(), evaluation["check_labels"].numpy(), config.probability_tolerance
        )
    except check.ServingCheckError as error:
        raise dg.Failure(
            f"Not deployed: the serving-path check failed: {error}. Production and the registry aliases are unchanged.",
            allow_retries=False,  # the same model and code fail the same way
            metadata=check.upload_check_metadata(error.uploads) if error.uploads else None,
        ) from error


def _serving_path_metadata(path: check.PathCheck | None) -> dict:
    if path is None:
        return {}
    return {
        "serving_check_images": path.images,
        "serving_check_disagreements": path.disagreements,
        "serving_check_max_probability_gap": path.max_probability_gap,
        "serving_check_accuracy": path.accuracy,
        "serving_check_latency_p50_ms": check.percentile_ms(path.latencies, 50),
        **check.upload_check_metadata(path.uploads),
    }


def _save_drift_reference(store, version: str, evaluation: dict, log) -> None:
    """The version's drift reference, written before it serves (as production or challenger), so that
    `prediction_drift` always finds one for the model that answered."""
    if "drift_reference" not in evaluation:  # an evaluation stored before drift monitoring existed
        log.warning(f"model_evaluation has no drift reference: prediction_drift will skip version {version}")
        return
    store.write_bytes(drift_reference_key(version), evaluation["drift_reference"])


def _deploy(store, candidate, previous: str | None, config: DeploymentConfig, mlflow: MlflowTracking, run_id: str):
    """`candidate` becomes production or, by `config.strategy`, the challenger; (decision, data version, where)."""
    version = candidate.version
    if config.strategy == Strategy.replace or previous is None:
        deploy.make_production(store, candidate, f"passed the gate in run {run_id}")
        mlflow.set_alias(PRODUCTION_ALIAS, version)
        return "production", version, bundle_prefix(version)
    deploy.start_trial(store, candidate, Routing(config.strategy, config.challenger_traffic))
    mlflow.set_alias(CHALLENGER_ALIAS, version)
    return f"challenger ({config.strategy})", f"{previous}+challenger-{version}", bundle_prefix(version)
