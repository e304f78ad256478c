"""Resource selection by environment, and the code location loading under each deployment.

Only resources change between dev, prod and a Dagster+ branch deployment; every asset sees the same
resource keys and types. A wrong setting is an error at load time that names the variable.
"""

import os
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import dagster as dg
import pytest

from mnist_dagster.definitions import build_defs
from mnist_dagster.resources import (
    branch_slug,
    deployment_name,
    dev_resources,
    executor_for,
    prod_resources,
    resources_for,
)
from mnist_dagster.resources.compute import ComputeResource
from mnist_dagster.resources.io_manager import TensorIOManager
from mnist_dagster.resources.mlflow import MlflowTracking, redact_uri
from mnist_dagster.resources.s3 import S3StorageResource
from mnist_dagster.resources.storage import LocalStorageResource
from mnist_dagster.storage import default_data_dir
from mnist_dagster_tests.support import REPO_ROOT

PROD_ENV = {  # dummy values: enough to load the definitions, nothing is contacted
    "S3_BUCKET": "example-bucket",
    "AWS_ACCESS_KEY_ID": "dummy",
    "AWS_SECRET_ACCESS_KEY": "dummy",
    "AWS_REGION": "eu-west-1",
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/",
}
FULL = {"DAGSTER_CLOUD_DEPLOYMENT_NAME": "prod"}
BRANCH = {"DAGSTER_CLOUD_DEPLOYMENT_NAME": "Feature/Faster CNN", "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "1"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "dev"),
        ({"DAGSTER_DEPLOYMENT": ""}, "dev"),
        ({"DAGSTER_DEPLOYMENT": "dev"}, "dev"),
        ({"DAGSTER_DEPLOYMENT": "prod"}, "prod"),
        ({"DAGSTER_DEPLOYMENT": " prod "}, "prod"),
        ({"DAGSTER_DEPLOYMENT": "branch"}, "branch"),
        (FULL, "prod"),  # Dagster+ full deployment
        ({**FULL, "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT": "0"}, "prod"),
        (BRANCH, "branch"),  # Dagster+ branch deployment
        ({**BRANCH, "DAGSTER_DEPLOYMENT": "prod"}, "branch"),  # a branch never gets production's storage
        ({**BRANCH, "DAGSTER_DEPLOYMENT": "dev"}, "dev"),
        ({**FULL, "DAGSTER_DEPLOYMENT": "dev"}, "dev"),  # explicit dev wins, e.g. a Dagster+ "local" scope
    ],
)
def test_deployment_is_chosen_from_the_environment(env, expected):
    assert deployment_name(env) == expected


@pytest.mark.parametrize("value", ["staging", "Prod", "production", "local"])
def test_wrong_deployment_is_an_error_at_load_time_naming_the_variable(value):
    with pytest.raises(ValueError, match=rf"DAGSTER_DEPLOYMENT='{value}' is not one of dev, prod, branch"):
        deployment_name({"DAGSTER_DEPLOYMENT": value})
    with pytest.raises(ValueError, match="DAGSTER_DEPLOYMENT"):
        build_defs(env={"DAGSTER_DEPLOYMENT": value})


@pytest.mark.parametrize("value", ["gpu", "CUDA", "mps", "cuda:0"])
def test_wrong_device_is_an_error_at_load_time_naming_the_variable(value):
    for make in (dev_resources, prod_resources):
        with pytest.raises(ValueError, match=rf"MNIST_DEVICE='{value}' is not one of auto, cpu, cuda"):
            make({**PROD_ENV, "MNIST_DEVICE": value})


@pytest.mark.parametrize(("value", "expected"), [("", "auto"), ("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda")])
def test_device_setting_reaches_the_compute_resource(value, expected):
    compute = dev_resources({"MNIST_DEVICE": value})["compute"]
    assert isinstance(compute, ComputeResource) and compute.device == expected


def test_every_deployment_offers_the_same_resources_to_the_same_assets(tmp_path):
    sets = {
        "dev": dev_resources({"MNIST_DATA_DIR": str(tmp_path)}),
        "prod": resources_for("prod", PROD_ENV),
        "branch": resources_for("branch", {**PROD_ENV, **BRANCH}),
    }
    keys = {name: set(resources) for name, resources in sets.items()}
    assert keys["dev"] == keys["prod"] == keys["branch"]
    assert keys["dev"] >= {"storage", "io_manager", "mlflow", "compute", "mnist_source"}
    for resources in sets.values():
        assert isinstance(resources["io_manager"], TensorIOManager)
        assert resources["io_manager"].storage is resources["storage"]  # assets and IO manager share one store
        assert isinstance(resources["mlflow"], MlflowTracking)


def test_dev_keeps_everything_under_the_data_folder(tmp_path):
    resources = dev_resources({"MNIST_DATA_DIR": str(tmp_path / "d")})
    assert isinstance(resources["storage"], LocalStorageResource)
    assert resources["storage"].root == str((tmp_path / "d").resolve())
    assert resources["mlflow"].tracking_uri == f"sqlite:///{(tmp_path / 'd').resolve()}/mlflow.db"
    assert resources["mlflow"].artifact_location == (tmp_path / "d" / "mlartifacts").resolve().as_uri()
    assert resources["mlflow"].browser_url() == "http://localhost:5000"


def test_dev_with_a_tracking_server_lets_the_server_place_artifacts(tmp_path):
    env = {"MNIST_DATA_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": "http://mlflow.local:5000"}
    mlflow = dev_resources(env)["mlflow"]
    assert (mlflow.tracking_uri, mlflow.artifact_location) == ("http://mlflow.local:5000", None)
    assert mlflow.browser_url() == "http://mlflow.local:5000"


def test_default_data_folder_is_the_git_ignored_data_dir_of_the_checkout():
    assert default_data_dir({}) == REPO_ROOT / "data"
    ignored = subprocess.run(["git", "check-ignore", "-q", "data/models/x.pt"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "data/ must be git-ignored"


def test_prod_reads_bucket_and_tracking_server_from_env_vars_at_run_time():
    resources = prod_resources({**PROD_ENV, "S3_PREFIX": "/team/mnist/"})
    storage = resources["storage"]
    assert isinstance(storage, S3StorageResource)
    assert storage.bucket == dg.EnvVar("S3_BUCKET")  # resolved when a step starts, never shown in the UI
    assert storage.prefix == "team/mnist"
    assert storage.s3.region_name == "eu-west-1"  # AWS_REGION, which botocore alone would ignore
    assert storage.s3.endpoint_url is None and storage.s3.aws_access_key_id is None  # boto3 reads the environment
    mlflow = resources["mlflow"]
    assert mlflow.tracking_uri == dg.EnvVar("MLFLOW_TRACKING_URI")
    assert mlflow.artifact_location is None  # the tracking server decides (proxied artifacts)
    assert mlflow.experiment_name == mlflow.registered_model_name == "mnist-digit-classifier"


def test_prod_prefix_defaults_and_ui_link_override():
    resources = prod_resources({**PROD_ENV, "MLFLOW_UI_URL": "https://mlflow.example.com/"})
    assert resources["storage"].prefix == "mnist-dagster"
    assert resources["mlflow"].ui_url == "https://mlflow.example.com/"


def test_branch_deployment_is_isolated_from_production():
    resources = resources_for("branch", {**PROD_ENV, **BRANCH, "S3_PREFIX": "mnist"})
    assert branch_slug(BRANCH) == "feature-faster-cnn"
    assert resources["storage"].prefix == "mnist/branches/feature-faster-cnn"
    mlflow = resources["mlflow"]
    assert mlflow.registered_model_name == mlflow.experiment_name == "mnist-digit-classifier-feature-faster-cnn"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "local"),
        ({"DAGSTER_CLOUD_GIT_BRANCH": "fix/NaN loss!"}, "fix-nan-loss"),
        ({"DAGSTER_CLOUD_DEPLOYMENT_NAME": "///"}, "branch"),
    ],
)
def test_branch_slug_is_safe_as_an_s3_key_and_an_mlflow_name(env, expected):
    assert branch_slug(env) == expected


def test_executor_per_deployment():
    assert executor_for("dev") is dg.in_process_executor
    assert executor_for("prod") is dg.multiprocess_executor
    assert executor_for("branch") is dg.multiprocess_executor


def test_unknown_deployment_passed_in_code_is_refused():
    with pytest.raises(ValueError, match="unknown deployment 'qa'"):
        resources_for("qa", PROD_ENV)


@pytest.mark.parametrize(
    ("uri", "redacted", "link_base"),
    [
        (
            "https://user:token@mlflow.example.com:8443/base/",
            "https://mlflow.example.com:8443/base/",
            "https://mlflow.example.com:8443/base",
        ),
        ("http://mlflow:5000", "http://mlflow:5000", "http://mlflow:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db", "http://localhost:5000"),
    ],
)
def test_tracking_credentials_never_reach_links_or_messages(uri, redacted, link_base):
    assert redact_uri(uri) == redacted
    assert MlflowTracking(tracking_uri=uri).browser_url() == link_base


def validate(env: dict[str, str], *target: str) -> subprocess.CompletedProcess:
    """`dagster definitions validate` in a fresh process, as a deployment would load the code location."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "S3_", "AWS_", "MLFLOW_", "MNIST_"))}
    return subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", *target],
        cwd=REPO_ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.parametrize(
    ("env", "target"),
    [
        ({"DAGSTER_DEPLOYMENT": "dev"}, ("-m", "mnist_dagster")),  # the package, as users type it by habit
        ({"DAGSTER_DEPLOYMENT": "prod", **PROD_ENV}, ("-m", "mnist_dagster", "-a", "defs")),
        ({**BRANCH, **PROD_ENV}, ("-w", "workspace.yaml")),
    ],
    ids=["dev", "prod", "dagster-plus-branch"],
)
def test_definitions_validate_under_each_deployment(env, target, tmp_path):
    result = validate({**env, "MNIST_DATA_DIR": str(tmp_path)}, *target)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_definitions_validate_fails_on_a_wrong_deployment(tmp_path):
    env = {"DAGSTER_DEPLOYMENT": "staging", "MNIST_DATA_DIR": str(tmp_path)}
    result = validate(env, "-m", "mnist_dagster", "-a", "defs")
    assert result.returncode != 0
    assert "DAGSTER_DEPLOYMENT='staging' is not one of dev, prod, branch" in result.stdout + result.stderr


def test_dagster_plus_config_deploys_this_code_location():
    """dagster_cloud.yaml (dagster-cloud CLI, CI actions), pyproject's [tool.dg] (`dg plus deploy`) and
    workspace.yaml (`dagster dev`) name the same location and the same module, and that module loads."""
    import importlib

    import yaml
    from dagster_cloud_cli.config.models import load_dagster_cloud_yaml

    cloud = load_dagster_cloud_yaml((REPO_ROOT / "dagster_cloud.yaml").read_text())  # the CLI's own schema
    (location,) = cloud.locations
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())["load_from"][0]["python_module"]
    tool = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]
    dg_project = tool["dg"]["project"]
    assert location.location_name == workspace["location_name"] == dg_project.get("code_location_name")
    assert location.location_name == tool["dagster"]["code_location_name"]
    modules = {
        "dagster_cloud.yaml": location.code_source.module_name,
        "workspace.yaml": workspace["module_name"],
        "[tool.dagster]": tool["dagster"]["module_name"],
        "[tool.dg.project]": dg_project["code_location_target_module"],
    }
    assert set(modules.values()) == {"mnist_dagster.definitions"}, modules
    assert (REPO_ROOT / location.build.directory / "Dockerfile").is_file()
    assert isinstance(importlib.import_module(location.code_source.module_name).defs, dg.Definitions)
