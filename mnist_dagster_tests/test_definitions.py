"""The code location's shape: the asset graph, its checks and automation, and a cheap import."""

import pkgutil
import subprocess
import sys

import dagster as dg
import pytest

from mnist_dagster.assets.automation import RETRAIN_ON_NEW_DATA
from mnist_dagster.definitions import build_defs

ASSET_GRAPH = {
    "raw_mnist_data": set(),
    "processed_mnist_data": {"raw_mnist_data"},
    "digit_classifier": {"processed_mnist_data"},
    "model_evaluation": {"digit_classifier", "processed_mnist_data"},
    "production_digit_classifier": {"digit_classifier", "model_evaluation"},
    "batch_digit_predictions": {"production_digit_classifier"},
    "digit_predictions": {"production_digit_classifier", "raw_mnist_data"},  # real test images for its check
    "ab_test_report": {"production_digit_classifier"},  # reads the trial from the store, not a value
}


def _asset_graph(defs: dg.Definitions):
    return defs.get_repository_def().asset_graph


def test_asset_graph_has_the_product_keys_and_edges(tmp_path):
    graph = _asset_graph(build_defs("dev", {"MNIST_DATA_DIR": str(tmp_path)}))
    got = {
        key.to_user_string(): {parent.to_user_string() for parent in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert {key: parents for key, parents in got.items() if key in ASSET_GRAPH} == ASSET_GRAPH
    assert set(got) >= set(ASSET_GRAPH)


def test_processed_data_checks_block_and_training_follows_automatically(tmp_path):
    defs = build_defs("dev", {"MNIST_DATA_DIR": str(tmp_path)})
    graph = _asset_graph(defs)
    specs = list(defs.get_assets_def("processed_mnist_data").check_specs)
    assert {spec.name for spec in specs} == {"shapes", "label_range", "class_balance", "no_nan"}
    assert all(spec.blocking for spec in specs)
    conditions = {key.to_user_string(): graph.get(key).automation_condition for key in graph.get_all_asset_keys()}
    expected = {
        "raw_mnist_data": None,  # started by new_labelled_data_sensor
        "processed_mnist_data": RETRAIN_ON_NEW_DATA,
        "digit_classifier": RETRAIN_ON_NEW_DATA,
        "model_evaluation": RETRAIN_ON_NEW_DATA,
        "production_digit_classifier": RETRAIN_ON_NEW_DATA,
        # the same condition, not waiting on raw_mnist_data (it only reads its test images)
        "digit_predictions": RETRAIN_ON_NEW_DATA.ignore(dg.AssetSelection.assets("raw_mnist_data")),
        "batch_digit_predictions": None,  # the nightly schedule's
        "ab_test_report": None,  # the daily schedule's, or by hand: not part of the automation chain
    }
    # Conditions compare by structure: plain eager(), even under the same label, is not equal.
    assert {key: conditions[key] for key in expected} == expected
    assert RETRAIN_ON_NEW_DATA != dg.AutomationCondition.eager().with_label(RETRAIN_ON_NEW_DATA.get_label())


def test_loading_the_code_location_imports_no_heavy_library():
    """`dagster dev` loads the definitions in every code server and run: torch and MLflow stay out of that path."""
    probe = (
        "import sys, mnist_dagster; mnist_dagster.defs; "
        "heavy = [m for m in ('torch', 'torchvision', 'mlflow', 'onnx', 'onnxruntime', 'matplotlib', 'pandas', "
        "'scipy', 'statsmodels', 'boto3', 'dagster_aws', 'dagster_k8s') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"heavy modules imported at load: {out}"


def test_ml_loads_a_submodule_and_torch_at_its_first_use():
    """`from mnist_dagster import ml` at the top of the Dagster modules costs nothing: `ml.data` imports
    `ml.data`, and torch with it, when a step first uses it (ml/__init__.py, PEP 562)."""
    probe = (
        "import sys; from mnist_dagster import ml; "
        "before = [m for m in ('torch', 'mnist_dagster.ml.data') if m in sys.modules]; "
        "ml.data.content_hash('x'); "
        "after = [m for m in ('torch', 'mnist_dagster.ml.data') if m in sys.modules]; "
        "print(','.join(before), ','.join(after), sep='|')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "|torch,mnist_dagster.ml.data", out


def test_ml_names_every_submodule_it_loads_lazily_and_nothing_else():
    from mnist_dagster import ml

    on_disk = {module.name for module in pkgutil.iter_modules(ml.__path__)}
    assert set(ml.__all__) == on_disk, "a new ml/ module goes into ml/__init__.py: __all__ and TYPE_CHECKING"
    assert set(ml.__all__) <= set(dir(ml))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        ml.nothing_here  # noqa: B018 - the attribute access is the test


@pytest.mark.slow  # 5 s or more on two cores (a pipeline, a server, a subprocess): left out of the edit loop
def test_the_package_is_a_target_for_dagster_asset_materialize(tmp_path, real_mnist_dir):
    """`-m mnist_dagster`, as Dagster users type it by habit, loads the code location and materializes
    (`raw_mnist_data`, from the local folder of real MNIST files)."""
    import os

    from mnist_dagster_tests.dagster_dev import isolated_env

    home = tmp_path / "home"
    home.mkdir()
    env = isolated_env(
        {
            "DAGSTER_HOME": str(home),
            "MNIST_DATA_DIR": str(tmp_path / "data"),
            "MNIST_MIRRORS": str(real_mnist_dir),
            "MNIST_DEVICE": "cpu",
        }
    )
    command = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mnist_dagster", "--select", "raw_mnist_data"]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "RUN_SUCCESS" in output
    assert (tmp_path / "data" / "assets" / "raw_mnist_data.pt").is_file()
    assert os.listdir(home)  # the run was recorded in the instance it was given
