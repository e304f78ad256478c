"""`rollback_job` under a live `mnist-dagster serve`: production goes back to an earlier verified bundle, the
running server answers with it within seconds and without a restart, the MLflow alias and the asset history
follow, and Slack hears it once; a version that does not exist or a corrupted bundle fails clearly and
changes nothing."""


import dagster as dg
import httpx
import mlflow
import pytest

from mnist_dagster.definitions import build_defs
from mnist_dagster.layout import bundle_prefix
from mnist_dagster.sensors.ml_sensors import slack_on_model_not_deployed
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.record import DeploymentRecord, read_record
from mnist_dagster.scoring import bundle
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import generated_model, running_server
from mnist_dagster_tests.support import generated_digits, wait_for

MODEL = "mnist-digit-classifier"


@pytest.fixture
def store(dev_env) -> LocalStore:
    """Versions 1, 2 and 3 went live in turn (one trained model, three versions); 3 serves; MLflow agrees."""
    store = LocalStore(dev_env["MNIST_DATA_DIR"])
    model = generated_model()
    for version in ("1", "2", "3"):
        deploy.make_production(store, bundle.make_bundle(version, model.onnx), f"deployed {version} in a test")
    client = registry(dev_env)
    client.create_registered_model(MODEL)
    for _ in range(3):
        client.create_model_version(MODEL, source="/nonexistent/stand-in-model", run_id=None)
    client.set_registered_model_alias(MODEL, "production", "3")
    return store


def registry(dev_env) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(build_defs("dev", dev_env).resources["mlflow"].tracking_uri)


def roll_back(dev_env, instance, **config) -> dg.ExecuteInProcessResult:
    """`rollback_job` as the code location defines it, with `config` for its op."""
    job = build_defs("dev", dev_env).resolve_job_def("rollback_job")
    return job.execute_in_process(
        run_config={"ops": {"roll_back_production": {"config": config}}}, instance=instance, raise_on_error=False
    )


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    [failure] = [event for event in result.all_events if event.event_type == dg.DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.error.message


def served_version(url: str) -> str:
    image = generated_digits(1, seed=3)[0][0]
    return httpx.post(f"{url}/predict", json={"pixels": image.tolist()}, timeout=5).json()["model_version"]


def production_state(store: LocalStore) -> DeploymentRecord:
    """The deployment record: production, challenger, history (what the endpoint follows)."""
    return read_record(store)


def test_a_missing_or_corrupted_version_fails_clearly_and_changes_nothing(dev_env, instance, store):
    before = production_state(store)
    missing = roll_back(dev_env, instance, version="99")
    assert not missing.success
    assert "Not rolled back: cannot roll back to version 99" in failure_message(missing)
    assert "Production is unchanged" in failure_message(missing)

    store.write_bytes(f"{bundle_prefix('2')}/model.onnx", b"not the model that was deployed")
    corrupted = roll_back(dev_env, instance)  # the default: the previous version, 2
    assert not corrupted.success
    assert "cannot roll back to version 2" in failure_message(corrupted)
    assert "model.onnx does not match its checksum" in failure_message(corrupted)

    already = roll_back(dev_env, instance, version="3")
    assert "version 3 is already in production" in failure_message(already)
    assert production_state(store) == before
    assert str(registry(dev_env).get_model_version_by_alias(MODEL, "production").version) == "3"
    assert instance.fetch_materializations(dg.AssetKey("production_digit_classifier"), limit=1).records == []


def test_the_running_server_answers_with_the_restored_version(dev_env, instance, store, slack_to_stub):
    resource, stub = slack_to_stub
    cursor = tick(instance, resource, None)
    with running_server(store.root, poll_seconds=1.0) as url:  # the server's default poll
        assert served_version(url) == "3"
        result = roll_back(dev_env, instance, reason="version 3 mislabels sevens")
        assert result.success
        wait_for(lambda: served_version(url) == "2", timeout=60, interval=0.05, message="the server to serve version 2")

    assert production_state(store).production == "2"
    assert [entry.version for entry in deploy.production_history(store)] == ["1", "2", "3", "2"]
    assert str(registry(dev_env).get_model_version_by_alias(MODEL, "production").version) == "2"
    [record] = instance.fetch_materializations(dg.AssetKey("production_digit_classifier"), limit=5).records
    metadata = {key: value.value for key, value in record.asset_materialization.metadata.items()}
    assert metadata["deployed"] is True and metadata["decision"] == "rolled back"
    assert (metadata["model_version"], metadata["previous_version"]) == ("2", "3")
    assert metadata["reason"] == "version 3 mislabels sevens"

    cursor = tick(instance, resource, cursor)
    tick(instance, resource, cursor)  # once, not at every tick
    [message] = stub.delivered
    assert message["text"].startswith(
        ":rewind: *Production rolled back* from version 3 to version 2: version 3 mislabels sevens."
    )
    assert f"/runs/{result.run_id}|" in message["text"]


def test_by_default_it_goes_back_to_the_version_before(dev_env, instance, store):
    assert roll_back(dev_env, instance).success
    assert production_state(store).production == "2"
    assert deploy.production_history(store)[-1].why == "rollback to 2"


# ----- Slack ------------------------------------------------------------------------------------------


def tick(instance, resource, cursor: str | None) -> str:
    context = dg.build_sensor_context(instance=instance, resources={"slack": resource}, cursor=cursor)
    return slack_on_model_not_deployed(context).cursor
