"""Fan-out: the nightly batch split into parallel scoring steps (nothing scored twice, whichever job scores),
and the sweep's candidates trained side by side, a process each, under the multiprocess executor."""

import io
import json
import os

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from mnist_dagster.layout import INBOX_PREFIX
from mnist_dagster.lifecycle import deploy
from mnist_dagster.scoring.batch import LEDGER_KEY
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.support import NO_COMPUTE_LOGS, generated_digits, pipeline_assets_and_checks

#: Inbox files of different sizes: (name, images); the bad file is rejected, once.
INBOX = [("night/a.npz", 900), ("night/b.npz", 500), ("night/c.npz", 300), ("day/d.npz", 200), ("day/e.npz", 7)]


def _npz(count: int, seed: int) -> bytes:
    images, _ = generated_digits(count, seed)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images)
    return buffer.getvalue()


@pytest.fixture
def store(dev_env, generated_bundle) -> LocalStore:
    """The dev store with a production model and an inbox of five batches and one unreadable file."""
    store = LocalStore(dev_env["MNIST_DATA_DIR"])
    deploy.make_production(store, generated_bundle, "test")
    for seed, (name, count) in enumerate(INBOX):
        store.write_bytes(f"{INBOX_PREFIX}/{name}", _npz(count, seed))
    store.write_bytes(f"{INBOX_PREFIX}/day/notes.txt", b"not an image")
    return store


def _fanout(dev_env, instance, shards: int) -> dg.ExecuteInProcessResult:
    from mnist_dagster.definitions import build_defs

    job = build_defs("dev", dev_env).resolve_job_def("batch_fanout_job")
    return job.execute_in_process(instance=instance, run_config={"ops": {"plan_batch_shards": {"config": {"shards": shards}}}})


def _scored(store: LocalStore) -> pd.DataFrame:
    keys = [item.key for item in store.list("predictions/scored") if item.key.endswith(".parquet")]
    return pd.concat([pd.read_parquet(io.BytesIO(store.read_bytes(key))) for key in keys], ignore_index=True)


def test_the_batch_fans_out_and_nothing_is_scored_twice(dev_env, dev_test_resources, instance, store):
    result = _fanout(dev_env, instance, shards=3)
    assert result.success
    shard_steps = [e.step_key for e in result.get_step_success_events() if e.step_key.startswith("score_batch_shard[")]
    assert len(shard_steps) == 3  # three parallel steps (processes, or pods on k8s, with a multi-process executor)
    scored = _scored(store)
    assert len(scored) == sum(count for _, count in INBOX) and scored["input_id"].is_unique
    assert len(list(store.list("predictions/scored"))) == 3  # one table per shard
    (materialization,) = [m for m in result.asset_materializations_for_node("commit_batch_ledger")]
    assert materialization.asset_key == dg.AssetKey("batch_digit_predictions")
    assert materialization.metadata["scored"].value == len(scored) and materialization.metadata["rejected"].value == 1
    ledger = json.loads(store.read_bytes(LEDGER_KEY))
    assert len(ledger["done"]) == len(INBOX) + 1 and len(ledger["seen"]) == len(INBOX) + 1

    again = _fanout(dev_env, instance, shards=3)  # nothing new: no shard at all
    assert again.success and not [e for e in again.get_step_success_events() if "score_batch_shard" in e.step_key]
    assert len(_scored(store)) == len(scored)

    # The single-step asset shares the ledger: it finds nothing new either, then scores only a new file,
    # which the fan-out then leaves alone.
    assets, _ = pipeline_assets_and_checks()
    single = dg.materialize(assets, selection=["batch_digit_predictions"], resources=dev_test_resources, instance=instance)
    assert single.asset_materializations_for_node("batch_digit_predictions")[0].metadata["scored"].value == 0
    store.write_bytes(f"{INBOX_PREFIX}/late/f.npz", _npz(11, 99))
    single = dg.materialize(assets, selection=["batch_digit_predictions"], resources=dev_test_resources, instance=instance)
    assert single.asset_materializations_for_node("batch_digit_predictions")[0].metadata["scored"].value == 11
    assert _fanout(dev_env, instance, shards=3).success
    final = _scored(store)
    assert len(final) == len(scored) + 11 and final["input_id"].is_unique


def test_shards_are_balanced_by_size(tmp_path):
    """Largest first, each to the lightest shard: every new file in one shard, loads within one file's size."""
    from mnist_dagster.scoring.batch import plan_shards

    store = LocalStore(tmp_path)
    for seed, (name, count) in enumerate(INBOX):
        store.write_bytes(f"{INBOX_PREFIX}/{name}", _npz(count, seed))
    plan = plan_shards(store, 2)
    keys = sorted(entry["key"] for shard in plan.shards for entry in shard)
    assert keys == sorted(f"{INBOX_PREFIX}/{name}" for name, _ in INBOX)
    loads = [sum(entry["size"] for entry in shard) for shard in plan.shards]
    assert max(loads) - min(loads) <= max(entry["size"] for shard in plan.shards for entry in shard)
    assert len(plan.seen) == len(INBOX) and not store.exists(LEDGER_KEY)  # planning writes nothing
    assert len(plan_shards(store, 10).shards) == len(INBOX)  # never an empty shard
    with pytest.raises(ValueError, match="shards must be at least 1"):
        plan_shards(store, 0)


# ----- parallel steps, for real: the multiprocess executor ------------------------------------------------


def fanout_jobs_with_a_process_per_step() -> dg.Definitions:
    """The batch fan-out and the sweep under the multiprocess executor (prod's), on dev resources from the
    environment the test sets; `dg.reconstructable` rebuilds them in each step's process."""
    from mnist_dagster.assets.experiment_assets import model_sweep
    from mnist_dagster.assets.prediction_assets import batch_fanout
    from mnist_dagster.resources import dev_resources

    jobs = [graph.to_job(f"{graph.name}_per_process", executor_def=dg.multiprocess_executor) for graph in (batch_fanout, model_sweep)]
    return dg.Definitions(jobs=jobs, resources=dev_resources(os.environ))


def _batch_job():
    return fanout_jobs_with_a_process_per_step().resolve_job_def("batch_fanout_per_process")


def _sweep_job():
    return fanout_jobs_with_a_process_per_step().resolve_job_def("model_sweep_per_process")


def _step_windows(instance, run_id: str, prefix: str) -> dict[str, tuple[float, float, int]]:
    """step key -> (launched, succeeded, pid) for the steps whose key starts with `prefix`: from the executor
    starting the step's process to the step's success, and the pid the step ran in."""
    launched, pids, ends = {}, {}, {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not (event.step_key or "").startswith(prefix):
            continue
        if event.event_type == dg.DagsterEventType.STEP_WORKER_STARTING:
            launched[event.step_key] = entry.timestamp
        elif event.event_type == dg.DagsterEventType.STEP_START:
            pids[event.step_key] = event.pid
        elif event.event_type == dg.DagsterEventType.STEP_SUCCESS:
            ends[event.step_key] = entry.timestamp
    return {key: (launched[key], ends[key], pids[key]) for key in ends}


def _overlap(windows: dict[str, tuple[float, float, int]]) -> bool:
    """Every step's process was started before any of them finished: they ran at the same time (how much
    their compute overlaps on a busy 2-core machine is the OS scheduler's business)."""
    return max(start for start, _, _ in windows.values()) < min(end for _, end, _ in windows.values())


@pytest.mark.slow  # real processes, 10-60 s: left out of the edit loop
def test_batch_shards_and_sweep_candidates_run_as_parallel_processes(dev_env, dev_test_resources, store, monkeypatch):
    for key, value in dev_env.items():
        monkeypatch.setenv(key, value)
    with dg.instance_for_test(overrides=NO_COMPUTE_LOGS) as instance:  # persistent: steps in their own processes
        run_config = {"ops": {"plan_batch_shards": {"config": {"shards": 2}}}}
        with dg.execute_job(dg.reconstructable(_batch_job), instance, run_config=run_config) as batch:
            assert batch.success
        windows = _step_windows(instance, batch.run_id, "score_batch_shard[")
        assert len(windows) == 2 and len({pid for _, _, pid in windows.values()}) == 2 and _overlap(windows)
        assert len(_scored(store)) == sum(count for _, count in INBOX)

        assets, checks = pipeline_assets_and_checks()
        data = dg.materialize([*assets, *checks], selection=["raw_mnist_data", "processed_mnist_data"],
                              resources=dev_test_resources, instance=instance)  # fmt: skip
        assert data.success
        sweep_config = {"ops": {"plan_sweep": {"config": {"candidates": ["cnn-fast", "cnn-accurate"], "epochs": 1}}}}
        with dg.execute_job(dg.reconstructable(_sweep_job), instance, run_config=sweep_config) as sweep:
            assert sweep.success
        windows = _step_windows(instance, sweep.run_id, "train_candidate[")
        assert len(windows) == 2 and len({pid for _, _, pid in windows.values()}) == 2 and _overlap(windows)
