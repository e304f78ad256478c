"""The one deployment record: typed, stored once, replaced atomically; two racing writers never both win.

Races are real: writer processes (locally: separate OS processes on one folder; on S3: threads against a
real moto server over HTTP) start together from the same read and each try to write their own change.
"""

import multiprocessing
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mnist_dagster.layout import DEPLOYMENT_KEY
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.record import (
    DeploymentError,
    DeploymentRecord,
    RecordConflict,
    Routing,
    Strategy,
    change_record,
    read_record,
    read_record_with_tag,
    write_record,
)
from mnist_dagster.scoring import bundle
from mnist_dagster.storage import LocalStore, S3Store, WriteConflict
from mnist_dagster_tests.s3_server import s3_client

WRITERS = 8


def _race_locally(root: str, tag: str | None, version: str, start, results) -> None:
    """One writer process: wait for the starting gun, then write `version` over the record read as `tag`."""
    store = LocalStore(root)
    start.wait()
    try:
        write_record(store, DeploymentRecord().with_production(version, f"writer {version}"), tag)
        results.put(version)
    except RecordConflict:
        results.put(None)


def test_racing_writer_processes_on_a_local_folder_leave_exactly_one_winner(tmp_path):
    store = LocalStore(tmp_path)
    for round_ in range(3):
        _, tag = read_record_with_tag(store)  # every writer read the same record
        context = multiprocessing.get_context("spawn")
        start, results = context.Event(), context.Queue()
        writers = [
            context.Process(target=_race_locally, args=(str(tmp_path), tag, f"{round_}-{i}", start, results))
            for i in range(WRITERS)
        ]
        for writer in writers:
            writer.start()
        start.set()
        for writer in writers:
            writer.join(timeout=120)
            assert writer.exitcode == 0, f"writer {writer.pid} did not finish"
        outcomes = [results.get(timeout=10) for _ in writers]
        winners = [version for version in outcomes if version is not None]
        assert len(winners) == 1, outcomes
        assert read_record(store).production == winners[0]  # the record holds the winner's change, whole


@pytest.fixture
def s3_store(s3_endpoint, monkeypatch, tmp_path) -> S3Store:
    from mnist_dagster_tests.s3_server import hermetic_aws

    hermetic_aws(monkeypatch, tmp_path)
    bucket = f"record-{uuid.uuid4().hex[:12]}"
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=bucket)
    return S3Store(client, bucket, "mnist-dagster")


def test_racing_writers_on_s3_leave_exactly_one_winner(s3_store):
    for round_ in range(3):
        _, tag = read_record_with_tag(s3_store)

        def write(index: int) -> str | None:
            try:
                write_record(s3_store, DeploymentRecord().with_production(f"{round_}-{index}", "race"), tag)
                return f"{round_}-{index}"
            except RecordConflict:
                return None

        with ThreadPoolExecutor(WRITERS) as pool:
            outcomes = list(pool.map(write, range(WRITERS)))
        winners = [version for version in outcomes if version is not None]
        assert len(winners) == 1, outcomes
        assert read_record(s3_store).production == winners[0]


def test_a_first_write_on_s3_refuses_to_overwrite_a_record_someone_created(s3_store):
    s3_store.write_if(DEPLOYMENT_KEY, DeploymentRecord().to_json(), None)
    with pytest.raises(WriteConflict):
        s3_store.write_if(DEPLOYMENT_KEY, DeploymentRecord().to_json(), None)


def test_change_record_decides_again_on_the_fresh_record(tmp_path):
    """A promotion that lost its race to a rollback that ended the trial is refused, not applied blindly."""
    store = LocalStore(tmp_path)
    model = bundle.make_bundle("1", b"onnx one")
    deploy.make_production(store, model, "first")
    deploy.start_trial(store, bundle.make_bundle("2", b"onnx two"), Routing(Strategy.ab_test, 0.1))
    stale, _ = read_record_with_tag(store)
    deploy.end_trial(store)  # another writer ends the trial after our read

    def promote(record: DeploymentRecord) -> DeploymentRecord:
        if record.challenger is None:
            raise DeploymentError("no challenger on trial to promote")
        return record.with_production(record.challenger, "promoted")

    assert stale.challenger == "2"
    with pytest.raises(DeploymentError, match="no challenger on trial"):
        change_record(store, promote)
    assert read_record(store).production == "1"


def test_the_record_round_trips_and_trials_get_their_own_id_and_start(tmp_path):
    store = LocalStore(tmp_path)
    deploy.make_production(store, bundle.make_bundle("1", b"one"), "first")
    first = deploy.start_trial(store, bundle.make_bundle("2", b"two"), Routing(Strategy.shadow))
    deploy.end_trial(store)
    second = deploy.start_trial(store, bundle.make_bundle("3", b"three"), Routing(Strategy.ab_test, 0.2))
    assert first.trial_id != second.trial_id and second.trial_started_at >= first.trial_started_at
    stored = read_record(store)
    assert stored == DeploymentRecord.from_json(stored.to_json()) == second
    assert stored.routing == Routing(Strategy.ab_test, 0.2)
    assert [entry.version for entry in stored.history] == ["1"]


def test_bundles_are_immutable_by_version(tmp_path):
    store = LocalStore(tmp_path)
    bundle.store_bundle(store, bundle.make_bundle("1", b"one"))
    bundle.store_bundle(store, bundle.make_bundle("1", b"one"))  # a retried step: the same bundle again
    with pytest.raises(bundle.BundleError, match="already stored with another model"):
        bundle.store_bundle(store, bundle.make_bundle("1", b"something else"))
    assert bundle.load(store, "1").onnx == b"one"


def test_an_invalid_record_is_refused_with_what_is_wrong(tmp_path):
    store = LocalStore(tmp_path)
    store.write_bytes(DEPLOYMENT_KEY, b'{"format": "mnist-dagster/deployment-v1", "share": 3}')
    with pytest.raises(ValueError, match="share must be a number in"):
        read_record(store)
    assert not Path(tmp_path, DEPLOYMENT_KEY + ".tmp").exists()
