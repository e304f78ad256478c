"""The model: train a CNN, evaluate it on the test set, deploy it only past the accuracy gate.

Each training is one MLflow run: params, per-epoch metrics, curves, the model, then the test metrics.
"""


import dagster as dg

from mnist_dagster.assets.automation import RETRAIN_ON_NEW_DATA, TRANSIENT_IO_RETRY
from mnist_dagster.assets.config import TrainingConfig, training_config
from mnist_dagster.assets.metadata import png_markdown, table
from mnist_dagster.assets.training import train_and_record
from mnist_dagster.layout import PRODUCTION_ROOT
from mnist_dagster.resources.compute import GPU_TRAINING_POD, ComputeResource
from mnist_dagster.resources.mlflow import REOPENED_BY_TAG, STARTED_BY_TAG, MlflowTracking
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


@dg.asset(
    group_name="model",
    kinds={"pytorch", "mlflow"},
    code_version="1",
    automation_condition=RETRAIN_ON_NEW_DATA,
)
def model_evaluation(
    context: dg.AssetExecutionContext,
    digit_classifier: dict,
    processed_mnist_data: dict,
    compute: ComputeResource,
    mlflow: MlflowTracking,
) -> dg.Output:
    """The trained model on the 10k held-out test images: accuracy, per-class scores, confusion matrix."""
    import mlflow as mlflow_lib

    from mnist_dagster.ml import evaluate, plots
    from mnist_dagster.ml.model import load_checkpoint

    device = compute.resolve_device()
    model, _ = load_checkpoint(digit_classifier, device)
    images, labels = processed_mnist_data["test_images"], processed_mnist_data["test_labels"]
    result = evaluate.evaluate(model, images, labels, device)
    confusion_png = plots.confusion_matrix_png(result.confusion)
    worst = result.misclassified(labels)[:24]
    mistakes_png = plots.digit_grid_png(
        images[worst], [f"{int(labels[i])}->{int(result.predictions[i])}" for i in worst.tolist()]
    )
    per_class = [
        {"digit": digit, "precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}
        for digit, (p, r, f) in enumerate(zip(result.precision, result.recall, result.f1, strict=True))
    ]
    run_id = digit_classifier["mlflow_run_id"]
    with mlflow.start_run(run_id=run_id):  # reopened by this Dagster run: if it dies, the orphan sensor closes it
        mlflow_lib.set_tag(REOPENED_BY_TAG, context.run_id)
        mlflow_lib.log_metrics(
            {"test_accuracy": result.accuracy, **{f"test_f1_digit_{row['digit']}": row["f1"] for row in per_class}}
        )
        mlflow.log_png(confusion_png, "confusion_matrix.png")
        mlflow.log_png(mistakes_png, "misclassified.png")
    context.log.info(f"test accuracy {result.accuracy:.4f} on {len(labels)} images")
    return dg.Output(
        {
            "test_accuracy": result.accuracy,
            "confusion_matrix": result.confusion,
            "per_class": per_class,
            "mlflow_run_id": run_id,
        },
        metadata={
            "test_accuracy": result.accuracy,
            "test_images": len(labels),
            "misclassified": int((result.predictions != labels).sum()),
            "per_class": table(per_class, ["digit", "precision", "recall", "f1"]),
            "confusion_matrix": png_markdown(confusion_png, "confusion matrix"),
            "misclassified_digits": png_markdown(mistakes_png, "misclassified digits (true->predicted)"),
            "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)),
        },
    )


class DeploymentConfig(dg.Config):
    accuracy_threshold: float = 0.95  # deploy only if test accuracy is strictly above this


@dg.asset(
    group_name="model",
    kinds={"onnx", "mlflow"},
    code_version="1",
    automation_condition=RETRAIN_ON_NEW_DATA,
    retry_policy=TRANSIENT_IO_RETRY,  # registry and S3 writes; below the gate it succeeds, so never retried
)
def production_digit_classifier(
    context: dg.AssetExecutionContext,
    config: DeploymentConfig,
    digit_classifier: dict,
    model_evaluation: dict,
    storage: StorageResource,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    """The model every prediction path uses: replaced only by a candidate above the accuracy gate.

    Below the gate the run still succeeds and the previous production model stays. Above it, the
    candidate becomes a new MLflow registry version, its bundle is written, the pointer flips, and the
    `production` alias moves, in that order, so no reader ever sees a half-deployed model.
    """
    from mnist_dagster.serving import bundle

    store = storage.open()
    accuracy = model_evaluation["test_accuracy"]
    previous = bundle.current_version(store, PRODUCTION_ROOT)
    run_id = digit_classifier["mlflow_run_id"]
    common = {"test_accuracy": accuracy, "threshold": config.accuracy_threshold, "mlflow_run_id": run_id}
    if not accuracy > config.accuracy_threshold:
        reason = f"test accuracy {accuracy:.4f} is not above the threshold {config.accuracy_threshold}"
        context.log.warning(f"Not deployed: {reason}; production stays at version {previous}")
        return dg.MaterializeResult(
            metadata={**common, "deployed": False, "reason": reason, "model_version": previous or "none"},
            data_version=dg.DataVersion(previous or "none"),
        )
    version = mlflow.register_version(digit_classifier["mlflow_model_uri"], run_id)
    candidate = bundle.make_bundle(
        version, digit_classifier["onnx"], test_accuracy=accuracy, mlflow_run_id=run_id, dagster_run_id=context.run_id
    )
    bundle.publish(store, PRODUCTION_ROOT, candidate)
    mlflow.set_production_alias(version)
    context.log.info(f"Deployed version {version} (test accuracy {accuracy:.4f}); previous was {previous}")
    return dg.MaterializeResult(
        metadata={
            **common,
            "deployed": True,
            "model_version": version,
            "previous_version": previous or "none",
            "registered_model": mlflow.registered_model_name,
            "bundle": dg.MetadataValue.path(store.uri(f"{PRODUCTION_ROOT}/{version}")),
        },
        data_version=dg.DataVersion(version),
    )
