"""Data-parallel training (DDP) for real: torchrun's processes, gloo on CPU, launched by the asset through
Dagster Pipes, on generated digits. Nothing is mocked: workers are real processes, one is really killed.

Linux only for the kill test (it finds the worker by its /proc entry).
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import mlflow
import pytest
import torch

from mnist_dagster.ml import data, distributed
from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.ml.model import load_checkpoint
from mnist_dagster.scoring import bundle
from mnist_dagster_tests.support import FAST_TRAINING, generated_split, pipeline_assets_and_checks, wait_for

TRAINING_SELECTION = ["raw_mnist_data", "processed_mnist_data", "digit_classifier"]


def _run_config(**training) -> dict:
    return {
        "ops": {
            "digit_classifier": {"config": {**FAST_TRAINING, "processes": 2, **training}},
            "processed_mnist_data": {"config": {"validation_fraction": 0.1}},
        }
    }


def _materialize(resources, instance, run_config) -> dg.ExecuteInProcessResult:
    assets, checks = pipeline_assets_and_checks()
    return dg.materialize(
        [*assets, *checks], selection=TRAINING_SELECTION, resources=resources, instance=instance,
        run_config=run_config, raise_on_error=False,
    )  # fmt: skip


def _ddp_processes() -> list[int]:
    """Live torchrun launchers and workers of this module (any parent), by their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if distributed.WORKER_MODULE.encode() in command:
            found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [item.split(b"=", 1)[1] for item in environ if item.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def _launch(tmp_path: Path, split_path: Path, processes: int = 2, **overrides) -> tuple[subprocess.CompletedProcess, Path]:
    config = TrainingConfig.from_mapping({**FAST_TRAINING, "processes": processes, **overrides}).as_params()
    checkpoint = tmp_path / "checkpoint.pt"
    command = distributed.launch_command(
        processes, split_path, config, checkpoint, "cpu", True, tmp_path / "failures.json", tmp_path / "logs"
    )
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=300), checkpoint


@pytest.fixture(scope="module")
def split_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "split.pt"
    torch.save(generated_split(1200, seed=0, val_fraction=0.1).as_dict(), path)
    return path


@pytest.mark.slow  # real processes, 10-60 s: left out of the edit loop
def test_the_seed_makes_a_two_process_run_reproducible(tmp_path, split_file):
    """Two torchrun launches with the same seed write bit-identical checkpoints; rank 0 reports every epoch."""
    first, first_checkpoint = _launch(tmp_path / "a", split_file)
    second, second_checkpoint = _launch(tmp_path / "b", split_file)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:] + second.stderr[-3000:]
    a, b = (torch.load(path, weights_only=True) for path in (first_checkpoint, second_checkpoint))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    reports = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in reports if r["kind"] == distributed.EPOCH] == [1, 2]  # rank 0 only: once each
    (result,) = [r for r in reports if r["kind"] == distributed.RESULT]
    assert result["world_size"] == 2


@pytest.mark.slow  # 5 s or more on two cores (a pipeline, a server, a subprocess): left out of the edit loop
def test_a_worker_python_error_comes_back_with_its_traceback(tmp_path):
    """Workers that raise: torchrun stops, and its failure record names the rank, the error and the traceback."""
    completed, checkpoint = _launch(tmp_path, tmp_path / "no-such-split.pt")
    assert completed.returncode != 0 and not checkpoint.exists()
    record = json.loads((tmp_path / "failures.json").read_text())
    root = record["failures"][0]
    assert root["signal"] is None and root["exitcode"] == 1
    assert "FileNotFoundError" in root["message"] and "no-such-split.pt" in root["traceback"]
    assert distributed.failure_summary(record).startswith(f"DDP worker rank {root['rank']} ")


@pytest.mark.slow  # real processes, 10-60 s: left out of the edit loop
def test_two_process_training_materializes_loads_and_serves(dev_test_resources, instance):
    """`digit_classifier` with processes=2: torchrun under Pipes, epochs in the step's log and in MLflow,
    a checkpoint that loads, and its ONNX model serves the test images."""
    result = _materialize(dev_test_resources, instance, _run_config())
    assert result.success
    messages = [event.message or "" for event in instance.all_logs(result.run_id)]
    assert any("epoch 2/2: train_loss=" in message for message in messages)  # rank 0's line, through Pipes
    stored = result.output_for_node("digit_classifier")
    model, _ = load_checkpoint(stored)
    assert sum(p.numel() for p in model.parameters()) > 0
    processed = result.output_for_node("processed_mnist_data")
    split = data.NormalisedSplit.from_dict(processed)
    pixels = data.to_unit_float(split.test_digits()).numpy()
    predicted = bundle.Predictor(bundle.make_bundle("ddp", stored["onnx"])).predict_proba(pixels).argmax(1)
    assert (predicted == split.test_labels.numpy()).mean() > 0.9
    client = mlflow.MlflowClient(dev_test_resources["mlflow"].tracking_uri)
    run = client.get_run(stored["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["processes"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
@pytest.mark.slow  # real processes, 10-60 s: left out of the edit loop
def test_a_killed_worker_fails_the_step_cleanly(dev_test_resources, instance):
    """SIGKILL rank 1 mid-training: the step fails naming the rank and the signal, torchrun leaves no
    worker behind, and the MLflow run is FAILED, not RUNNING."""
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.setdefault("result", _materialize(dev_test_resources, instance, _run_config(epochs=400)))
    )
    thread.start()
    try:
        run_id = wait_for(lambda: next(iter(instance.get_run_ids()), None), timeout=120, message="the run")
        wait_for(
            lambda: any("epoch 1/400" in (e.message or "") for e in instance.all_logs(run_id)),
            timeout=240, message="rank 0's first epoch",
        )  # fmt: skip
        victim = wait_for(lambda: next((p for p in _ddp_processes() if _rank_of(p) == 1), None), message="rank 1")
        os.kill(victim, signal.SIGKILL)
    finally:
        thread.join(timeout=300)
    result = outcome["result"]
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    error = failure.step_failure_data.user_failure_data
    assert error is not None and f"rank 1 (pid {victim})" in error.description and "SIGKILL" in error.description
    assert "Signal 9 (SIGKILL)" in error.metadata["torchrun_report"].value
    # torchrun stops rank 0 and exits: nothing is left running
    wait_for(lambda: _ddp_processes() == [], timeout=120, message="every DDP process to exit")
    client = mlflow.MlflowClient(dev_test_resources["mlflow"].tracking_uri)
    runs = client.search_runs([dev_test_resources["mlflow"].experiment_id()])
    assert [r.info.status for r in runs] == ["FAILED"]
