"""Resources by environment: the same assets run on a laptop (dev) and in production (prod).

`DAGSTER_DEPLOYMENT` picks the set (`dev` or `prod`); on Dagster+ a full deployment defaults to
`prod` and a branch deployment to `branch` (prod's S3 and MLflow, its own S3 prefix).
"""

import os
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

from mnist_dagster.resources.compute import ComputeResource
from mnist_dagster.resources.io_manager import TensorIOManager
from mnist_dagster.resources.mlflow import MlflowTracking
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster.resources.storage import LocalStorage, S3Storage, StorageResource

DEPLOYMENTS = ("dev", "prod", "branch")
REPO_ROOT = Path(__file__).resolve().parents[2]


def deployment_name(env: Mapping[str, str] = os.environ) -> str:
    """Which resource set to use; an unknown `DAGSTER_DEPLOYMENT` is an error at load time."""
    explicit = env.get("DAGSTER_DEPLOYMENT", "").strip()
    if explicit:
        if explicit not in DEPLOYMENTS:
            raise ValueError(f"DAGSTER_DEPLOYMENT={explicit!r} is not one of {', '.join(DEPLOYMENTS)}")
        return explicit
    if env.get("DAGSTER_CLOUD_DEPLOYMENT_NAME"):
        return "branch" if env.get("DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT") == "1" else "prod"
    return "dev"


def data_dir(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("MNIST_DATA_DIR") or REPO_ROOT / "data").expanduser().resolve()


def dev_resources(env: Mapping[str, str] = os.environ) -> dict[str, object]:
    """Local files under `MNIST_DATA_DIR`, a SQLite MLflow store beside them, CPU unless told otherwise."""
    root = data_dir(env)
    storage = LocalStorage(root=str(root))
    return {
        "storage": storage,
        "io_manager": TensorIOManager(storage=storage),
        "mnist_source": MnistSource(mirrors=env.get("MNIST_MIRRORS", "")),
        "compute": ComputeResource(device=env.get("MNIST_DEVICE", "auto")),
        "mlflow": MlflowTracking(
            tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}",
            artifact_location=(root / "mlartifacts").as_uri(),
        ),
    }


def prod_resources(env: Mapping[str, str] = os.environ, prefix: str | None = None) -> dict[str, object]:
    """S3 (`S3_BUCKET`, `S3_PREFIX`) for everything, a tracking server for MLflow, the GPU when present."""
    from dagster_aws.s3 import S3Resource

    storage: StorageResource = S3Storage(
        bucket=dg.EnvVar("S3_BUCKET"), prefix=prefix or env.get("S3_PREFIX", "mnist-dagster"), s3=S3Resource()
    )
    return {
        "storage": storage,
        "io_manager": TensorIOManager(storage=storage),
        "mnist_source": MnistSource(mirrors=env.get("MNIST_MIRRORS", "")),
        "compute": ComputeResource(device=env.get("MNIST_DEVICE", "auto")),
        "mlflow": MlflowTracking(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"), ui_url=env.get("MLFLOW_UI_URL") or env.get("MLFLOW_TRACKING_URI", "")),
    }


def resources_for(deployment: str, env: Mapping[str, str] = os.environ) -> dict[str, object]:
    if deployment == "dev":
        return dev_resources(env)
    if deployment == "branch":
        base = env.get("S3_PREFIX", "mnist-dagster")
        return prod_resources(env, prefix=f"{base}/branches/{env.get('DAGSTER_CLOUD_DEPLOYMENT_NAME', 'branch')}")
    return prod_resources(env)


def executor_for(deployment: str) -> dg.ExecutorDefinition:
    """dev: every step in the run's own process, so torch, MLflow and the data load once per run;
    prod: a process per step, so a training step's GPU memory is released when it ends."""
    return dg.in_process_executor if deployment == "dev" else dg.multiprocess_executor
