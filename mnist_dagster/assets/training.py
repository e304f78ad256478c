"""Training inside a Dagster step: `ml.train.fit` wrapped in its MLflow run.

`digit_classifier` and the sweep's `train_candidate` op both train through `train_and_record`, so a
model trained in a sweep is recorded exactly as one the pipeline trains: params, per-epoch metrics,
the data it saw, the curve, the ONNX model with its input contract, and the checkpoint.

With `processes` > 1 the same `fit` runs data-parallel (DDP) in torchrun's workers, launched through
Dagster Pipes (`fit_with_torchrun`): rank 0's log lines reach the step live, its per-epoch metrics and
result come back as Pipes messages (then to MLflow), and its checkpoint comes back as a file.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from dagster._core.errors import DagsterPipesExecutionError  # not re-exported at the top level

from mnist_dagster import ml
from mnist_dagster.resources.compute import ComputeResource
from mnist_dagster.resources.mlflow import MlflowTracking


@dataclass(frozen=True)
class TrainingRecord:
    trained: ml.train.TrainedModel
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
    settings: ml.config.TrainingConfig,
    compute: ComputeResource,
    mlflow: MlflowTracking,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any] | None = None,
) -> TrainingRecord:
    """Train `settings` on the processed split in a new MLflow run (`tags` may name a parent run)."""
    split = ml.data.NormalisedSplit.from_dict(processed)
    device = compute.resolve_device()

    def log_metrics(stats: ml.train.EpochStats) -> None:
        mlflow.log_metrics(
            {"train_loss": stats.train_loss, "val_accuracy": stats.val_accuracy, "learning_rate": stats.learning_rate},
            step=stats.epoch,
        )

    def log_epoch(stats: ml.train.EpochStats) -> None:
        log.info(
            f"{run_name} epoch {stats.epoch}/{settings.epochs}: train_loss={stats.train_loss:.4f} "
            f"val_accuracy={stats.val_accuracy:.4f} ({stats.seconds:.1f}s)"
        )
        log_metrics(stats)

    with mlflow.start_run(run_name=run_name, tags=dict(tags)) as run:
        run_params = {**settings.as_params(), **(params or {}), "device": device, "train_size": len(split.train_labels)}
        mlflow.log_params(run_params)
        mlflow.log_training_data(
            split.train_images.numpy(), split.train_labels.numpy(), source=processed["source"], digest=processed["data_version"]
        )
        if settings.processes > 1:  # rank 0 logs its epochs to the step live, through Pipes
            trained = fit_with_torchrun(split, settings, device, compute.mixed_precision)
            for stats in trained.history:
                log_metrics(stats)
        else:
            trained = ml.train.fit(split, settings, device, compute.mixed_precision, on_epoch=log_epoch)
        mlflow.log_params({"parameters": trained.parameters})
        mlflow.log_metrics({"training_seconds": trained.seconds})
        onnx, curve, model_uri = _export_and_log(mlflow, run.info.run_id, trained, split)
    return TrainingRecord(trained, onnx, curve, run.info.run_id, model_uri)


def _export_and_log(
    mlflow: MlflowTracking, run_id: str, trained: ml.train.TrainedModel, split: ml.data.NormalisedSplit
) -> tuple[bytes, bytes, str]:
    """The ONNX graph exported and logged as the run's model while, in a background thread, the curve,
    the architecture and the checkpoint are uploaded in one go; (onnx, curve png, model URI).

    Leaving the `with` joins the thread, and `result()` re-raises a failed upload in the step: the step
    never ends (or reports success) before every artifact is stored."""
    history = trained.history
    curve = ml.plots.training_curve_png([h.train_loss for h in history], [h.val_accuracy for h in history])
    architecture = {"architecture": trained.checkpoint["architecture"], **trained.checkpoint["config"]}
    files = {
        "training_curve.png": curve,
        "architecture.json": json.dumps(architecture, indent=2).encode(),
        "checkpoint.pt": ml.model.checkpoint_to_bytes(trained.checkpoint),
    }
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-artifacts") as background:
        uploaded = background.submit(mlflow.log_files, run_id, files)
        onnx = ml.model.export_onnx(trained.checkpoint)
        model_uri = mlflow.log_onnx_model(onnx, input_example(split))
        uploaded.result()
    return onnx, curve, model_uri


def fit_with_torchrun(
    split: ml.data.NormalisedSplit, settings: ml.config.TrainingConfig, device: str, mixed_precision: bool
) -> ml.train.TrainedModel:
    """`ml.train.fit` on `settings.processes` DDP workers (`ml.distributed`: torchrun --standalone), launched
    from the current step with `PipesSubprocessClient`; returns the `TrainedModel` rank 0 saved and reported.

    A worker that dies fails the step with its error (rank, signal or exception and traceback); torchrun
    stops the other workers before this returns, and the caller's MLflow run ends FAILED.
    """
    ml.distributed.check_processes(settings.processes, device)
    with tempfile.TemporaryDirectory(prefix="mnist-ddp-") as folder:
        work = Path(folder)
        ml.distributed.save_split(split, work / "split.pt")
        command = ml.distributed.launch_command(
            settings.processes, work / "split.pt", settings.as_params(), work / "checkpoint.pt", device,
            mixed_precision, work / "failures.json", work / "logs",
        )  # fmt: skip
        invocation = _run_pipes(command, work / "failures.json")
        return ml.distributed.collect(invocation.get_custom_messages(), work / "checkpoint.pt", device)


def _run_pipes(command: list[str], failures: Path) -> Any:
    """Run `command` under Dagster Pipes in the current step; a failed worker becomes a `dg.Failure`
    carrying torchrun's record of it (retrying would fail the same way)."""
    try:
        # `train_and_record` is handed the step's logger, not its context: Pipes takes the current one
        return dg.PipesSubprocessClient().run(context=dg.OpExecutionContext.get(), command=command)
    except DagsterPipesExecutionError as error:
        if not failures.exists():  # torchrun itself failed (bad arguments, no free port): its own error
            raise
        record = json.loads(failures.read_text())
        root = record["failures"][0]
        raise dg.Failure(
            description=ml.distributed.failure_summary(record),
            metadata={
                "torchrun_report": dg.MetadataValue.text(record["report"]),
                "worker_traceback": dg.MetadataValue.text(root["traceback"] or "(none: the worker raised no Python error)"),
            },
            allow_retries=False,
        ) from error


def input_example(split: ml.data.NormalisedSplit, count: int = 2) -> np.ndarray:
    """A few validation images as the model takes them: float32 (N, 1, 28, 28) in [0, 1], unnormalised."""
    pixels = split.val_images[:count] * split.std + split.mean
    return pixels.clamp(0, 1).numpy()
