"""The model zoo on generated data: every architecture and augmentation through the one training entry
point, the checkpoint format and ONNX, a real endpoint, named candidates in the pipeline, and the sweep.

Real-data accuracy and timing per candidate are in `benchmarks/model_zoo_benchmark.py`, not here.
"""

import typing
from dataclasses import replace

import dagster as dg
import httpx
import mlflow
import numpy as np
import onnxruntime as ort
import pytest
import torch

from mnist_dagster.definitions import build_defs
from mnist_dagster.ml import architectures, data, model, train
from mnist_dagster.ml.config import CANDIDATES, Augmentation, TrainingConfig
from mnist_dagster.lifecycle import deploy
from mnist_dagster.scoring import bundle
from mnist_dagster.scoring.preprocess import encode_png
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.serving_support import running_server
from mnist_dagster_tests.support import (
    PIPELINE_ASSETS,
    generated_digits,
    generated_split,
    pipeline_assets_and_checks,
    wait_for,
)

#: Each architecture at a size that trains in a second or two on generated digits.
TINY = {
    "cnn": TrainingConfig(architecture="cnn", channels=(4, 8), hidden=16),
    "resnet": TrainingConfig(architecture="resnet", channels=(4, 8), depth=1),
    "vit": TrainingConfig(architecture="vit", hidden=16, depth=1, heads=2, patch_size=7),
}
QUICK = {"epochs": 2, "batch_size": 64, "max_lr": 0.01}
#: What the endpoint test serves: every architecture, and an ensemble of three tiny CNNs.
SERVED = {**TINY, "ensemble": replace(TINY["cnn"], members=3)}


@pytest.fixture(scope="module")
def split() -> data.NormalisedSplit:
    return generated_split(1200, seed=3, val_fraction=0.1, test_count=300)


def test_every_architecture_is_registered_and_every_candidate_builds():
    assert set(architectures.ARCHITECTURES) == set(typing.get_args(typing.get_type_hints(TrainingConfig)["architecture"]))
    assert set(TINY) == set(architectures.ARCHITECTURES)
    assert {"cnn-fast", "cnn-accurate", "resnet", "vit"} <= set(CANDIDATES)
    assert CANDIDATES["cnn-fast"] == TrainingConfig()  # the default is today's model
    for name, config in CANDIDATES.items():
        network = architectures.build(config.architecture, architectures.params_of(config.architecture, config))
        assert network(torch.zeros(2, 1, 28, 28)).shape == (2, 10), name


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_checkpoint_names_its_architecture_round_trips_weights_only_and_exports_faithful_onnx(architecture):
    config = TINY[architecture]
    params = architectures.params_of(architecture, config)
    torch.manual_seed(0)
    network = architectures.build(architecture, params).eval()
    checkpoint = model.make_checkpoint(network, architecture, params, mean=0.13, std=0.31)
    restored, norm = model.load_checkpoint(model.checkpoint_from_bytes(model.checkpoint_to_bytes(checkpoint)))
    assert checkpoint["architecture"] == architecture and norm == {"mean": 0.13, "std": 0.31}
    assert type(restored.network) is type(network) and restored.temperature == 1.0
    pixels = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        expected = torch.softmax(network((pixels - 0.13) / 0.31), 1).numpy()
        assert torch.allclose(network(pixels), restored(pixels))
    session = ort.InferenceSession(model.export_onnx(checkpoint), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixels": pixels.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_foreign_dicts_are_refused_and_checkpoints_from_before_the_zoo_still_load():
    params = architectures.params_of("cnn", TINY["cnn"])
    network = architectures.build("cnn", params).eval()
    checkpoint = model.make_checkpoint(network, "cnn", params, 0.1, 0.3)
    with pytest.raises(ValueError, match="checkpoint"):
        model.load_checkpoint({"state_dict": checkpoint["state_dict"]})
    with pytest.raises(ValueError, match="unknown architecture 'mlp'"):
        model.load_checkpoint({**checkpoint, "architecture": "mlp"})
    legacy = {key: value for key, value in checkpoint.items() if key != "architecture"} | {"format": model.CNN_V1_FORMAT}
    restored, _ = model.load_checkpoint(legacy)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(restored(x), network(x))


@pytest.mark.parametrize("architecture", sorted(TINY))
def test_each_architecture_trains_reproducibly_for_a_seed(split, architecture):
    config = replace(TINY[architecture], **QUICK)
    first, again, other = train.fit(split, config), train.fit(split, config), train.fit(split, replace(config, seed=1))
    assert first.history[-1].train_loss < first.history[0].train_loss  # it learns
    for name, tensor in first.checkpoint["state_dict"].items():
        assert torch.equal(tensor, again.checkpoint["state_dict"][name]), name
    assert any(not torch.equal(t, other.checkpoint["state_dict"][n]) for n, t in first.checkpoint["state_dict"].items())


@pytest.mark.parametrize("augmentation", typing.get_args(Augmentation))
def test_each_augmentation_is_seeded_keeps_the_range_and_never_touches_labels(split, augmentation):
    config = replace(TINY["cnn"], augmentation=augmentation)
    background = -split.mean / split.std
    images = split.train_images[:64]
    batches = [train.augment_batch(images.clone(), config, torch.Generator().manual_seed(s), background) for s in (0, 0, 1)]
    assert batches[0].shape == images.shape and torch.equal(batches[0], batches[1])
    assert batches[0].min() >= background - 1e-5 and batches[0].max() <= images.max() + 1e-5
    if augmentation != "none":
        assert not torch.equal(batches[0], images) and not torch.equal(batches[0], batches[2])
    # The digit stays: ink is moved, not erased or invented (labels stay true of the augmented images).
    ink = (images - background).sum(dim=(1, 2, 3))
    augmented_ink = (batches[0] - background).sum(dim=(1, 2, 3))
    low, high = (0.2, 4.0) if augmentation == "robust" else (0.5, 1.5)  # robust also thickens and thins strokes
    assert torch.all(augmented_ink > low * ink) and torch.all(augmented_ink < high * ink)


def test_every_architecture_is_served_by_the_same_endpoint(split, tmp_path):
    """No change on the serving side: each architecture's bundle is published and answered by a real uvicorn,
    which agrees digit for digit with the model's own ONNX answers."""
    store = LocalStore(tmp_path / "store")
    images, _ = generated_digits(20, seed=9)
    with running_server(tmp_path / "store") as url:
        for version, architecture in enumerate(sorted(SERVED), start=1):
            onnx = model.export_onnx(train.fit(split, replace(SERVED[architecture], **QUICK)).checkpoint)
            published = bundle.make_bundle(str(version), onnx)
            deploy.make_production(store, published, "test")
            expected = bundle.Predictor(published).predict_proba(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255)
            wait_for(lambda: httpx.get(f"{url}/health").json().get("model_version") == str(version), message=architecture)
            served = []
            for image in images:
                answer = httpx.post(f"{url}/predict", content=encode_png(image), headers={"Content-Type": "image/png"})
                assert answer.status_code == 200 and answer.json()["model_version"] == str(version), architecture
                served.append(answer.json()["digit"])
            assert served == expected.argmax(1).tolist(), architecture


def test_an_ensemble_is_one_graph_averaging_its_members_calibrated_probabilities(split):
    """members=3: three networks trained as `fit` trains each alone (seeds 0, 1, 2, each with its temperature),
    checkpointed and exported as one ONNX graph that serves the mean of their calibrated probabilities."""
    config = replace(TINY["cnn"], **QUICK)
    ensemble = train.fit(split, replace(config, members=3))
    alone = [train.fit(split, replace(config, seed=seed)) for seed in range(3)]
    assert ensemble.checkpoint["architecture"] == "ensemble" and ensemble.parameters == sum(m.parameters for m in alone)
    assert len(ensemble.history) == 3 * config.epochs and [s.epoch for s in ensemble.history] == list(range(1, 7))
    restored, norm = model.load_checkpoint(model.checkpoint_from_bytes(model.checkpoint_to_bytes(ensemble.checkpoint)))
    assert restored.network.temperatures.tolist() == pytest.approx([m.temperature for m in alone])
    pixels = (split.test_images[:40] * norm["std"] + norm["mean"]).clamp(0, 1)
    with torch.no_grad():
        members = torch.stack([m.model((pixels - norm["mean"]) / norm["std"]).softmax(1) for m in alone]).mean(0)
    expected = torch.softmax(members.log() / ensemble.temperature, 1).numpy()
    session = ort.InferenceSession(model.export_onnx(ensemble.checkpoint), providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"pixels": pixels.numpy()})
    np.testing.assert_allclose(served, expected, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {"candidate": "vit", "hidden": 16, "depth": 1, "heads": 2, "patch_size": 7, "epochs": 1},
        {"candidate": "ensemble", "channels": [4, 8], "hidden": 16, "epochs": 1, "members": 2},
    ],
    ids=["vit", "ensemble"],
)
def test_digit_classifier_trains_a_named_candidate_and_says_so(dev_test_resources, instance, overrides):
    assets, checks = pipeline_assets_and_checks()
    name = overrides["candidate"]
    run_config = {"ops": {"digit_classifier": {"config": overrides}}}
    result = dg.materialize(
        [*assets, *checks], selection=["raw_mnist_data", "processed_mnist_data", "digit_classifier"],
        resources=dev_test_resources, instance=instance, run_config=run_config,
    )  # fmt: skip
    assert result.success
    metadata = result.asset_materializations_for_node("digit_classifier")[0].metadata
    assert metadata["candidate"].value == name and metadata["architecture"].value == CANDIDATES[name].architecture
    assert metadata["augmentation"].value == CANDIDATES[name].augmentation  # the candidate's, not overridden
    assert metadata["parameters"].value > 0
    stored = result.output_for_node("digit_classifier")
    assert stored["temperature"] > 0 and stored["architecture"] == ("ensemble" if name == "ensemble" else name)
    run = mlflow.MlflowClient(dev_test_resources["mlflow"].tracking_uri).get_run(metadata["mlflow_run_id"].value)
    assert run.data.params["architecture"] == CANDIDATES[name].architecture and run.data.params["candidate"] == name
    assert int(run.data.params["parameters"]) == metadata["parameters"].value


def sweep_definitions(dev_env: dict, md5s: dict) -> dg.Definitions:
    from mnist_dagster.resources.mnist_source import MnistSource

    defs = build_defs("dev", dev_env)
    resources = {**defs.resources, "mnist_source": MnistSource(mirrors=dev_env["MNIST_MIRRORS"], md5s=md5s)}
    return dg.Definitions(assets=defs.assets, jobs=defs.jobs, sensors=defs.sensors, resources=resources)


@pytest.mark.slow  # real processes, 10-60 s: left out of the edit loop
def test_sweep_of_two_candidates_reports_the_leaderboard_and_hands_the_winner_to_the_gate(dev_env, fake_mirror, instance):
    defs = sweep_definitions(dev_env, fake_mirror[1])
    assets, checks = pipeline_assets_and_checks()
    data_only = dg.materialize(
        [*assets, *checks], selection=["raw_mnist_data", "processed_mnist_data"], resources=defs.resources, instance=instance
    )
    assert data_only.success
    run_config = {
        "ops": {
            "plan_sweep": {"config": {"candidates": ["cnn-fast", "resnet"], "epochs": 1}},
            "report_leaderboard": {"config": {"deploy_winner": True}},
        }
    }
    sweep = defs.resolve_job_def("model_sweep_job").execute_in_process(instance=instance, run_config=run_config)
    assert sweep.success
    assert len([e for e in sweep.get_step_success_events() if e.step_key.startswith("train_candidate[")]) == 2

    event = instance.get_latest_materialization_event(dg.AssetKey("candidate_leaderboard"))
    metadata = {key: value.value for key, value in event.asset_materialization.metadata.items()}
    rows = [record.data for record in metadata["leaderboard"].records]
    assert {row["candidate"] for row in rows} == {"cnn-fast", "resnet"}
    assert set(rows[0]) >= {"architecture", "augmentation", "parameters", "val_accuracy", "test_accuracy",
                            "expected_calibration_error", "robustness_worst_accuracy", "training_seconds",
                            "onnx_ms_per_image"}  # fmt: skip
    for row in rows:
        assert 0 <= row["robustness_worst_accuracy"] <= 1 and 0 <= row["expected_calibration_error"] <= 1
    best = max(rows, key=lambda row: row["val_accuracy"])
    assert metadata["winner"] == best["candidate"] and "validation accuracy" in metadata["chosen_on"]
    assert "data:image/png;base64," in metadata["accuracy_vs_training_time"]

    client = mlflow.MlflowClient(defs.resources["mlflow"].tracking_uri)
    parent = client.get_run(metadata["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert {child.data.tags["candidate"] for child in children} == {"cnn-fast", "resnet"}
    assert all("test_accuracy" in child.data.metrics for child in children)

    from mnist_dagster.sensors.sweep import sweep_winner_sensor

    tick = sweep_winner_sensor(dg.build_sensor_context(instance=instance))
    (request,) = tick.run_requests
    config = request.run_config["ops"]["digit_classifier"]["config"]
    assert config["candidate"] == metadata["winner"] and config["epochs"] == 1
    assert sweep_winner_sensor(dg.build_sensor_context(instance=instance, cursor=tick.cursor)).run_requests == []


def test_materialize_all_is_still_the_pipeline_and_never_the_sweep(dev_env):
    defs = build_defs("dev", dev_env)
    graph = defs.resolve_asset_graph()
    leaderboard = graph.get(dg.AssetKey("candidate_leaderboard"))
    assert not leaderboard.is_executable and leaderboard.group_name == "experiments"
    full = defs.resolve_job_def("full_pipeline_job").asset_layer.selected_asset_keys
    assert {key.to_user_string() for key in full} == PIPELINE_ASSETS
    assert "candidate_leaderboard" not in PIPELINE_ASSETS
