"""The sweep: named candidates trained and evaluated side by side, reported as `candidate_leaderboard`.

Shape, and why: `model_sweep_job` (jobs/) is an op job that fans out one `train_candidate` step per
candidate (in parallel under a process-per-step or Kubernetes executor, one at a time per `training`
pool slot) and reports `candidate_leaderboard`, an external asset. The leaderboard sits in the asset
graph, downstream of `processed_mnist_data`, with its table, plot and winner in the UI, but it is not
materializable: "Materialize all" stays the seven-asset, one-minute pipeline, starts no sweep of
fifteen-minute trainings and opens no partition dialog.

The winner is chosen on validation accuracy, never on test accuracy. It reaches production the way any
model does: with `deploy_winner`, `sweep_winner_sensor` launches `training_job` with the winner's
settings; the same seed trains the same model, and the gate judges it.
"""

import time

import dagster as dg
import numpy as np

from mnist_dagster import ml
from mnist_dagster.assets.metadata import png_markdown, table
from mnist_dagster.assets.training import TrainingRecord, train_and_record
from mnist_dagster.ml.config import CANDIDATES, candidate
from mnist_dagster.resources.compute import GPU_TRAINING_POD, ComputeResource
from mnist_dagster.resources.io_manager import READS_ASSET
from mnist_dagster.resources.mlflow import STARTED_BY_TAG, MlflowTracking
from mnist_dagster.scoring.bundle import Predictor, make_bundle

CANDIDATE_LEADERBOARD = dg.AssetKey("candidate_leaderboard")
LEADERBOARD_COLUMNS = [
    "candidate", "architecture", "augmentation", "parameters", "val_accuracy", "test_accuracy",
    "expected_calibration_error", "robustness_worst_accuracy", "training_seconds", "onnx_ms_per_image",
]  # fmt: skip

candidate_leaderboard = dg.AssetSpec(
    CANDIDATE_LEADERBOARD,
    deps=["processed_mnist_data"],
    group_name="experiments",
    kinds={"mlflow"},
    description="The latest model sweep: each candidate's accuracy, size and speed, and the winner "
    "(on validation accuracy). Reported by model_sweep_job; not part of Materialize all.",
)


class SweepConfig(dg.Config):
    candidates: list[str] = list(CANDIDATES)  # which named candidates to train (ml/config.py)
    epochs: int | None = None  # train every candidate for this many epochs instead of its own (quick sweeps)


@dg.op(out=dg.DynamicOut(dict))
def plan_sweep(context: dg.OpExecutionContext, config: SweepConfig, mlflow: MlflowTracking):
    """One step per candidate, all under one MLflow parent run."""
    unknown = [name for name in config.candidates if name not in CANDIDATES]
    if unknown or not config.candidates:
        raise dg.Failure(f"unknown or no candidates {unknown}; choose from {', '.join(CANDIDATES)}", allow_retries=False)
    parent = mlflow.create_parent_run(f"sweep-{context.run_id[:8]}", {STARTED_BY_TAG: context.run_id})
    context.log.info(f"Sweeping {', '.join(config.candidates)} under MLflow run {parent}")
    overrides = {"epochs": config.epochs} if config.epochs else {}
    for name in config.candidates:
        plan = {"candidate": name, "overrides": overrides, "parent_run_id": parent}
        yield dg.DynamicOutput(plan, mapping_key=name.replace("-", "_"))


@dg.op(
    ins={
        "processed": dg.In(
            input_manager_key="io_manager",
            asset_key=dg.AssetKey("processed_mnist_data"),  # lineage in the UI
            metadata={READS_ASSET: ["processed_mnist_data"]},  # where the IO manager finds its value
        )
    },
    pool="training",
    tags={"dagster-k8s/config": GPU_TRAINING_POD},
)
def train_candidate(
    context: dg.OpExecutionContext, plan: dict, processed: dict, compute: ComputeResource, mlflow: MlflowTracking
) -> dict:
    """Train one candidate (a child MLflow run), then measure it: test accuracy, calibration error after its
    temperature, worst accuracy in the evaluation's robustness table, ONNX latency."""
    name = plan["candidate"]
    settings = candidate(name, **plan["overrides"])
    tags = {STARTED_BY_TAG: context.run_id, "mlflow.parentRunId": plan["parent_run_id"], "candidate": name}
    record = train_and_record(context.log, processed, settings, compute, mlflow, f"{name}-{context.run_id[:8]}", tags)
    split = ml.data.NormalisedSplit.from_dict(processed)  # once, for both measurements
    scores = _test_scores(record, split, compute.resolve_device())
    milliseconds = _onnx_ms_per_image(record.onnx, split)
    with mlflow.start_run(run_id=record.run_id):
        mlflow.log_metrics({**scores, "onnx_ms_per_image": milliseconds})
    return {
        "candidate": name,
        "architecture": settings.architecture,
        "augmentation": settings.augmentation,
        "parameters": record.trained.parameters,
        "val_accuracy": round(record.trained.history[-1].val_accuracy, 5),
        **{key: round(value, 5) for key, value in scores.items()},
        "training_seconds": round(record.trained.seconds, 1),
        "onnx_ms_per_image": round(milliseconds, 3),
        "settings": settings.as_params(),
        "mlflow_run_id": record.run_id,
        "parent_run_id": plan["parent_run_id"],
    }


def _test_scores(record: TrainingRecord, split: "ml.data.NormalisedSplit", device: str) -> dict[str, float]:
    """Test accuracy, ECE (as served: after the temperature) and the worst robustness condition, in one pass."""
    evaluation, scored = ml.evaluate.score_in_one_pass(
        record.trained.model, split.test_images, split.test_labels, split.mean, split.std, device
    )
    metrics = ml.evaluate.run_metrics(scored, ["calibration", "robustness"])
    return {
        "test_accuracy": evaluation.accuracy,
        "expected_calibration_error": metrics["calibration"].scalars["expected_calibration_error"],
        "robustness_worst_accuracy": metrics["robustness"].scalars["robustness_worst_accuracy"],
    }


def _onnx_ms_per_image(onnx: bytes, split: "ml.data.NormalisedSplit", requests: int = 200) -> float:
    """Median milliseconds of one single-image request to ONNX Runtime, as the endpoint makes them."""
    predictor = Predictor(make_bundle("sweep", onnx))
    pixels = ml.data.to_unit_float(split.test_digits()[:requests]).numpy()
    timings = []
    for image in pixels:
        started = time.perf_counter()
        predictor.predict_proba(image[None])
        timings.append(time.perf_counter() - started)
    return float(np.median(timings)) * 1000


class LeaderboardConfig(dg.Config):
    deploy_winner: bool = False  # hand the winner to training_job, and so to the gate (sweep_winner_sensor)


@dg.op
def report_leaderboard(
    context: dg.OpExecutionContext, config: LeaderboardConfig, rows: list[dict], mlflow: MlflowTracking
) -> None:
    """The leaderboard as `candidate_leaderboard`'s materialization, and on the MLflow parent run."""
    rows = sorted(rows, key=lambda row: row["val_accuracy"], reverse=True)
    winner = rows[0]  # validation accuracy only: the test set stays an unbiased judge
    parent = winner["parent_run_id"]
    mlflow.finish_run(parent, {"winner_val_accuracy": winner["val_accuracy"]}, {"rows": rows, "winner": winner["candidate"]})
    plot = ml.plots.accuracy_vs_time_png(
        [row["candidate"] for row in rows], [row["training_seconds"] for row in rows], [row["val_accuracy"] for row in rows]
    )
    context.log.info(f"Winner: {winner['candidate']} (validation accuracy {winner['val_accuracy']:.4f})")
    context.log_event(
        dg.AssetMaterialization(
            CANDIDATE_LEADERBOARD,
            description=f"{len(rows)} candidates; winner {winner['candidate']} on validation accuracy",
            metadata={
                "winner": winner["candidate"],
                "winner_val_accuracy": winner["val_accuracy"],
                "winner_settings": dg.MetadataValue.json(winner["settings"]),
                "chosen_on": "validation accuracy (the test set is reported, never used to choose)",
                "leaderboard": table(rows, LEADERBOARD_COLUMNS),
                "accuracy_vs_training_time": png_markdown(plot, "validation accuracy against training time"),
                "deploy_winner": config.deploy_winner,
                "mlflow_parent_run": dg.MetadataValue.url(mlflow.run_url(parent)),
                "mlflow_parent_run_id": parent,
            },
        )
    )


@dg.graph
def model_sweep():
    report_leaderboard(plan_sweep().map(train_candidate).collect())
