"""A step killed outright (the OOM killer, kill -9) never ends its MLflow run; `close_orphaned_mlflow_runs`
marks it KILLED once Dagster has marked the run FAILURE or CANCELED.

No mocks: a real process starts the MLflow run exactly as `digit_classifier` does (through the
resource) and is SIGKILLed, the run failure is reported the way Dagster reports a dead run worker
(`report_run_failed`), and the real sensor is evaluated against a real instance and a real MLflow store.
"""

import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest

from mnist_dagster.resources.mlflow import MlflowTracking
from mnist_dagster.sensors.orphaned_runs import KILLED_RUNS_TAG, close_orphaned_mlflow_runs
from mnist_dagster_tests.dagster_dev import (
    TERMINAL_RUN_STATUSES,
    DagsterDev,
    first_error,
    group_pids,
    loopback_dev_env,
    running_dagster_dev,
)
from mnist_dagster_tests.support import REPO_ROOT, finishes_within, free_port, wait_for

#: Starts an MLflow run the way `digit_classifier` does, says so, then trains "forever".
TRAINING_STAND_IN = """
import sys, time
from mnist_dagster.resources.mlflow import MlflowTracking
tracking = MlflowTracking(tracking_uri=sys.argv[1], artifact_location=sys.argv[2])
with tracking.start_run(run_name="train-killed", tags={"dagster_run_id": sys.argv[3]}) as run:
    print("started", run.info.run_id, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def tracking(tmp_path) -> MlflowTracking:
    """The dev setup: a SQLite store with artifacts beside it."""
    return MlflowTracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_location=(tmp_path / "art").as_uri())


def read_line(process: subprocess.Popen, timeout: float) -> str:
    """The process's next stdout line; fails the test (and kills it) if none comes within `timeout`."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            process.kill()
            pytest.fail(f"no output within {timeout:.0f}s; stderr: {process.communicate()[1][-2000:]}")
    return process.stdout.readline()


def start_and_kill_training(tracking: MlflowTracking, dagster_run_id: str) -> str:
    """A process that starts a tagged MLflow run and is SIGKILLed mid-"training"; the run's id."""
    arguments = [tracking.tracking_uri, tracking.artifact_location, dagster_run_id]
    command = [sys.executable, "-c", TRAINING_STAND_IN, *arguments]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(process, timeout=60)
        assert line.startswith("started "), line
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    return line.split()[1]


def client(tracking: MlflowTracking):
    """The resource's own `MlflowClient`, pointed at its store."""
    return tracking._client()[1]


def status(tracking: MlflowTracking, mlflow_run_id: str) -> str:
    return client(tracking).get_run(mlflow_run_id).info.status


def tagged_run(tracking: MlflowTracking, dagster_run_id: str, experiment: str | None = None) -> str:
    """A RUNNING MLflow run tagged with `dagster_run_id`, in the resource's experiment unless told otherwise."""
    mlflow_client = client(tracking)
    if experiment is None:
        experiment_id = tracking.experiment_id()
    else:
        experiment_id = mlflow_client.create_experiment(experiment, artifact_location=tracking.artifact_location)
    return mlflow_client.create_run(experiment_id, tags={"dagster_run_id": dagster_run_id}).info.run_id


def failed_dagster_run(instance: dg.DagsterInstance, run_id: str | None = None) -> dg.DagsterRun:
    """A started run, then reported failed: what Dagster does when it finds the run worker dead.

    The run has no remote origin (as runs of `dg.materialize` and tests), and the sensor context built
    below has no code location either, so `_in_this_code_location` compares (None, None) with (None, None)
    and handles it, the same way the Slack sensor tests match their in-process runs."""
    run = instance.add_run(
        dg.DagsterRun(job_name="__ASSET_JOB", run_id=run_id or str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED)
    )
    instance.report_run_failed(run)
    return instance.get_run_by_id(run.run_id)


def tick(instance: dg.DagsterInstance, tracking: MlflowTracking, cursor: str | None) -> dg.SensorResult:
    """One evaluation of the real sensor, as the daemon does it: resource bound, cursor from the last tick."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"mlflow": tracking})
    result = close_orphaned_mlflow_runs(context)
    assert isinstance(result, dg.SensorResult) and not result.run_requests
    return result


def engine_messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [entry.message for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)]


@pytest.mark.slow  # a killed training subprocess, 5 s or more on two cores (15-16 s in full runs): left out of the edit loop
def test_a_killed_training_run_is_marked_killed_and_the_dagster_run_says_so(instance, tracking):
    dagster_run_id = str(uuid.uuid4())
    killed = start_and_kill_training(tracking, dagster_run_id)
    assert status(tracking, killed) == "RUNNING"  # what the issue is about: nobody ends it

    finished = tagged_run(tracking, dagster_run_id)
    client(tracking).set_terminated(finished, status="FINISHED")
    other_dagster_run = tagged_run(tracking, str(uuid.uuid4()))  # a training still in progress elsewhere
    other_experiment = tagged_run(tracking, dagster_run_id, experiment="someone-elses-experiment")

    failed = failed_dagster_run(instance, dagster_run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE

    result = tick(instance, tracking, cursor=None)  # first tick: the look-back covers the recent failure

    assert status(tracking, killed) == "KILLED"
    assert client(tracking).get_run(killed).data.tags["mnist_dagster.closed_by"] == (
        f"dagster run {dagster_run_id} ended FAILURE"
    )
    assert status(tracking, finished) == "FINISHED"
    assert status(tracking, other_dagster_run) == "RUNNING"
    assert status(tracking, other_experiment) == "RUNNING"

    assert instance.get_run_by_id(dagster_run_id).tags[KILLED_RUNS_TAG] == killed
    [message] = [text for text in engine_messages(instance, dagster_run_id) if "MLflow" in text]
    assert killed in message and "KILLED" in message
    assert "Marked 1 orphaned MLflow run(s) KILLED" in result.skip_reason.skip_message

    again = tick(instance, tracking, result.cursor)  # the event is behind the cursor: nothing repeats
    assert again.cursor == result.cursor
    assert len([text for text in engine_messages(instance, dagster_run_id) if "MLflow" in text]) == 1


def test_canceled_runs_are_cleaned_too_and_runs_without_orphans_leave_no_record(instance, tracking):
    cursor = tick(instance, tracking, cursor=None).cursor  # nothing has ended yet
    clean = failed_dagster_run(instance)
    canceled = instance.add_run(
        dg.DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED)
    )
    orphan = tagged_run(tracking, canceled.run_id)
    instance.report_run_canceled(canceled)

    tick(instance, tracking, cursor)

    assert status(tracking, orphan) == "KILLED"
    assert instance.get_run_by_id(canceled.run_id).tags[KILLED_RUNS_TAG] == orphan
    assert KILLED_RUNS_TAG not in instance.get_run_by_id(clean.run_id).tags
    assert not [text for text in engine_messages(instance, clean.run_id) if "MLflow" in text]


def test_an_mlflow_outage_keeps_the_event_for_a_later_tick(instance, tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    down = MlflowTracking(tracking_uri=f"http://mlflow-user:s3cret-pw@127.0.0.1:{free_port()}")  # nothing listens
    cursor = tick(instance, down, cursor=None).cursor  # no run has ended: MLflow is not even asked
    dagster_run = failed_dagster_run(instance)
    orphan = tagged_run(tracking, dagster_run.run_id)

    # A tick must not hang on a dead server: one 5 s request timeout, no retry; 120 s means it hangs.
    outage = finishes_within(lambda: tick(instance, down, cursor), 120, "a sensor tick against a dead MLflow")
    assert outage.cursor == cursor  # the failure is still ahead of the cursor
    assert "MLflow failed, retrying next tick" in outage.skip_reason.skip_message
    assert "s3cret-pw" not in outage.skip_reason.skip_message  # tracking URIs may carry credentials
    assert KILLED_RUNS_TAG not in instance.get_run_by_id(dagster_run.run_id).tags

    back = tick(instance, tracking, outage.cursor)  # MLflow is back (here: the working store)
    assert status(tracking, orphan) == "KILLED"
    assert instance.get_run_by_id(dagster_run.run_id).tags[KILLED_RUNS_TAG] == orphan
    assert back.cursor != cursor


def test_closing_is_idempotent_and_never_creates_an_experiment(tracking):
    assert tracking.close_orphaned_runs(str(uuid.uuid4())) == []
    assert client(tracking).get_experiment_by_name(tracking.experiment_name) is None
    dagster_run_id = str(uuid.uuid4())
    orphan = tagged_run(tracking, dagster_run_id)
    assert tracking.close_orphaned_runs(dagster_run_id, "CANCELED") == [orphan]
    assert tracking.close_orphaned_runs(dagster_run_id, "CANCELED") == []
    with pytest.raises(ValueError):
        tracking.close_orphaned_runs("x' OR tags.dagster_run_id != '")



def test_a_run_reopened_by_another_dagster_run_is_closed_when_that_one_dies(tracking):
    """`model_evaluation` reopens the training's MLflow run, possibly in another Dagster run: if that one
    dies mid-step, the run it reopened is its orphan."""
    from mnist_dagster.resources.mlflow import REOPENED_BY_TAG

    training, evaluation = str(uuid.uuid4()), str(uuid.uuid4())
    reopened = tagged_run(tracking, training)
    client(tracking).set_tag(reopened, REOPENED_BY_TAG, evaluation)
    assert tracking.close_orphaned_runs(evaluation) == [reopened]
    assert status(tracking, reopened) == "KILLED"


# --- the whole thing under `dagster dev` ------------------------------------------------------------

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
#: Training that would take many minutes: the test kills it long before it ends.
SLOW_TRAINING = {"ops": {"digit_classifier": {"config": {"epochs": 200}}}}
T = TypeVar("T")
MLFLOW_RUN_OF = """
SELECT runs.run_uuid, runs.status FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid
WHERE tags.key = 'dagster_run_id' AND tags.value = ?
"""


def mlflow_runs_of(store: Path, dagster_run_id: str) -> dict[str, str]:
    """MLflow run id -> status for the runs tagged with `dagster_run_id`, read straight from the SQLite store
    (read-only, so the test never creates or migrates the store the run worker is about to create)."""
    if not store.is_file():
        return {}
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as db:
            return dict(db.execute(MLFLOW_RUN_OF, (dagster_run_id,)).fetchall())
    except sqlite3.OperationalError:  # the run worker is still creating the tables
        return {}


def wait_while_running(what: str, check: Callable[[], T], timeout: float, dev: DagsterDev, run_id: str) -> T:
    """`check()`'s first truthy answer, polled every half second. Fails naming `what`, the run's first error
    and the server log if time runs out, or at once if the run ended before `check` came true."""
    deadline = time.monotonic() + timeout
    while True:
        dev.raise_if_exited()
        answer = check()
        if answer:
            return answer
        status = dev.api.run_status(run_id)
        if status in TERMINAL_RUN_STATUSES or time.monotonic() > deadline:
            error = first_error(dev.api.run_events(run_id))
            pytest.fail(f"{what}: not within {timeout:.0f}s; run {run_id} {status}, {error}; log: {dev.log_path}")
        time.sleep(0.5)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def run_worker_pid(dev: DagsterDev, run_id: str) -> int | None:
    """The process executing run `run_id` (dev runs every step in it: the in-process executor).

    A worker started as `dagster api execute_run` names the run in its command line; the code server's
    own workers (`dagster dev`) do not, but they capture their output with a `tail -F <compute log>` child
    whose log path does, so the worker is that tail's parent."""
    for pid in group_pids(dev.process.pid):
        args = cmdline(pid)
        if any(run_id in arg for arg in args):
            try:
                return parent(pid) if args[0].endswith("tail") else pid
            except OSError:
                continue
    return None


@pytest.fixture
def dagster_dev_env(tmp_path, real_mnist_dir) -> Iterator[dict[str, str]]:
    """`dagster dev`'s environment: a temporary home configured like the repository, real MNIST from a
    loopback mirror (the product's md5s; generated files would not pass them)."""
    with loopback_dev_env(tmp_path, real_mnist_dir, MNIST_DEVICE="cpu") as env:
        yield env


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.timeout(420)
def test_under_dagster_dev_a_kill_9_during_training_ends_with_the_mlflow_run_killed(dagster_dev_env, tmp_path):
    """Launch the pipeline, SIGKILL its run worker once `digit_classifier` has started its MLflow run (what the
    OOM killer does); Dagster marks the run FAILURE, then the running sensor marks the MLflow run KILLED and
    says so in the run's log. No setting is needed: the code server reports a dead worker within a second."""
    store = Path(dagster_dev_env["MNIST_DATA_DIR"]) / "mlflow.db"
    with running_dagster_dev(dagster_dev_env, tmp_path / "dagster-dev.log") as dev:
        selector = {"repositoryLocationName": "mnist_dagster", "repositoryName": "__repository__"}
        params = {"selector": {**selector, "jobName": "full_pipeline_job"}, "runConfigData": SLOW_TRAINING}
        launched = dev.api.query(LAUNCH_RUN, params=params)["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]

        started = partial(mlflow_runs_of, store, run_id)
        [mlflow_run] = wait_while_running("digit_classifier starts its MLflow run", started, 240, dev, run_id)
        assert mlflow_runs_of(store, run_id) == {mlflow_run: "RUNNING"}
        worker = wait_for(partial(run_worker_pid, dev, run_id), timeout=30, message="the run worker's process")
        os.kill(worker, signal.SIGKILL)

        assert dev.wait_for_run(run_id, timeout=60) == "FAILURE"
        # Nothing else ends the MLflow run (the bug); the sensor does on its next tick, at most 30 s later.
        wait_for(
            lambda: mlflow_runs_of(store, run_id)[mlflow_run] == "KILLED",
            timeout=90,
            interval=0.5,
            message=f"the sensor to mark MLflow run {mlflow_run} KILLED (dagster dev log: {dev.log_path})",
        )
        # The sensor closes the MLflow run first, then writes its engine event into the run's log.
        said = lambda: any(  # noqa: E731
            mlflow_run in (event.get("message") or "") and "marked KILLED" in (event.get("message") or "")
            for event in dev.api.run_events(run_id)
        )
        wait_for(said, timeout=30, interval=0.5, message=f"the run's log to say MLflow run {mlflow_run} was marked KILLED")
        assert dev.stop().clean
