"""Training inside a Dagster step: `ml.train.fit` wrapped in its MLflow run.

`digit_classifier` and the sweep's `train_candidate` op both train through `train_and_record`, so a
model trained in a sweep is recorded exactly as one the pipeline trains: params, per-epoch metrics,
the data it saw, the curve, the ONNX model with its input contract, and the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mnist_dagster.resources.compute import ComputeResource
from mnist_dagster.resources.mlflow import MlflowTracking


@dataclass(frozen=True)
class TrainingRecord:
    trained: Any  # ml.train.TrainedModel
    onnx: bytes
    curve_png: bytes
    run_id: str
    model_uri: str

    def stored_value(self) -> dict[str, Any]:
        """What the IO manager stores for a trained model: checkpoint, ONNX and where MLflow has them."""
        return {**self.trained.checkpoint, "onnx": self.onnx, "mlflow_run_id": self.run_id, "mlflow_model_uri": self.model_uri}


def train_and_record(
    log: logging.Logger | Any,
    processed: Mapping[str, Any],
    settings: Any,  # ml.config.TrainingConfig
    compute: ComputeResource,
    mlflow: MlflowTracking,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
) -> TrainingRecord:
    """Train `settings` on the processed split in a new MLflow run (`tags` may name a parent run)."""
    import mlflow as mlflow_lib

    from mnist_dagster.ml import data, plots, train
    from mnist_dagster.ml.model import checkpoint_to_bytes, export_onnx

    split = data.NormalisedSplit.from_dict(processed)
    device = compute.resolve_device()

    def log_epoch(stats: train.EpochStats) -> None:
        log.info(
            f"{run_name} epoch {stats.epoch}/{settings.epochs}: train_loss={stats.train_loss:.4f} "
            f"val_accuracy={stats.val_accuracy:.4f} ({stats.seconds:.1f}s)"
        )
        mlflow_lib.log_metrics(
            {"train_loss": stats.train_loss, "val_accuracy": stats.val_accuracy, "learning_rate": stats.learning_rate},
            step=stats.epoch,
        )

    with mlflow.start_run(run_name=run_name, tags=dict(tags)) as run:
        mlflow_lib.log_params({**settings.as_params(), **(params or {}), "device": device, "train_size": len(split.train_labels)})
        mlflow.log_training_data(
            split.train_images.numpy(), split.train_labels.numpy(), source=processed["source"], digest=processed["data_version"]
        )
        trained = train.fit(split, settings, device, compute.mixed_precision, on_epoch=log_epoch)
        onnx = export_onnx(trained.checkpoint)
        curve = plots.training_curve_png([h.train_loss for h in trained.history], [h.val_accuracy for h in trained.history])
        mlflow_lib.log_params({"parameters": trained.parameters})
        mlflow_lib.log_metric("training_seconds", trained.seconds)
        mlflow.log_png(curve, "training_curve.png")
        mlflow_lib.log_dict({"architecture": trained.checkpoint["architecture"], **trained.checkpoint["config"]}, "architecture.json")
        model_uri = mlflow.log_model(onnx, checkpoint_to_bytes(trained.checkpoint), input_example(split))
    return TrainingRecord(trained, onnx, curve, run.info.run_id, model_uri)


def input_example(split: Any, count: int = 2) -> Any:
    """A few validation images as the model takes them: float32 (N, 1, 28, 28) in [0, 1], unnormalised."""
    pixels = split.val_images[:count] * split.std + split.mean
    return pixels.clamp(0, 1).numpy()
