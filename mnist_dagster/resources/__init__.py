"""Resources by environment: the same assets run on a laptop (dev) and in production (prod).

`DAGSTER_DEPLOYMENT` picks the set: `dev` (the default) or `prod`. On Dagster+, a full deployment
(`DAGSTER_CLOUD_DEPLOYMENT_NAME` set) defaults to `prod`, and a branch deployment
(`DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT=1`) always gets `branch`: prod's bucket and MLflow server, but
its own S3 prefix, experiment and registered model, so a pull request can never overwrite the
production bundle or move the `production` alias. Any other value is an error at load time.

Only resources differ between the sets; the assets, the IO manager and the file formats are one
code path (`TensorIOManager` + `Store`), so a model saved in prod loads exactly as one saved in dev.
"""

import os
import re
from collections.abc import Mapping

import dagster as dg

from mnist_dagster.resources.compute import ComputeResource, check_device
from mnist_dagster.resources.io_manager import TensorIOManager
from mnist_dagster.resources.mlflow import MlflowTracking
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster.resources.serving import ServingEndpoint
from mnist_dagster.resources.slack import slack_alerts
from mnist_dagster.resources.storage import LocalStorageResource, StorageResource
from mnist_dagster.storage import default_data_dir

DEPLOYMENTS = ("dev", "prod", "branch")
DEFAULT_S3_PREFIX = "mnist-dagster"
MLFLOW_NAME = "mnist-digit-classifier"  # experiment and registered model (prod); branches add a suffix


def deployment_name(env: Mapping[str, str] = os.environ) -> str:
    """`dev`, `prod` or `branch`, from `DAGSTER_DEPLOYMENT` and the variables Dagster+ sets."""
    explicit = env.get("DAGSTER_DEPLOYMENT", "").strip()
    if explicit and explicit not in DEPLOYMENTS:
        raise ValueError(f"DAGSTER_DEPLOYMENT={explicit!r} is not one of {', '.join(DEPLOYMENTS)} (unset means dev)")
    in_branch = env.get("DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT", "").strip() == "1"
    if explicit in {"dev", "branch"}:
        return explicit
    if explicit == "prod" or env.get("DAGSTER_CLOUD_DEPLOYMENT_NAME") or in_branch:
        return "branch" if in_branch else "prod"
    return "dev"


def branch_slug(env: Mapping[str, str] = os.environ) -> str:
    """The branch deployment's name, safe as an S3 key segment and an MLflow name."""
    name = env.get("DAGSTER_CLOUD_DEPLOYMENT_NAME") or env.get("DAGSTER_CLOUD_GIT_BRANCH") or "local"
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")[:63] or "branch"


def _compute_and_source(env: Mapping[str, str]) -> dict[str, object]:
    """What dev and prod share: the MNIST mirrors, the device (`MNIST_DEVICE` checked here, at load), and
    the endpoint to check after publishing (`MNIST_SERVING_URL`)."""
    return {
        "mnist_source": MnistSource(mirrors=env.get("MNIST_MIRRORS", "")),
        "compute": ComputeResource(device=check_device(env.get("MNIST_DEVICE", "").strip() or "auto")),
        "serving_endpoint": ServingEndpoint(url=env.get("MNIST_SERVING_URL", "").strip()),
    }


def dev_resources(env: Mapping[str, str] = os.environ) -> dict[str, object]:
    """Local files under `MNIST_DATA_DIR`, a SQLite MLflow store beside them, the GPU only if present."""
    root = default_data_dir(env)
    storage = LocalStorageResource(root=str(root))
    tracking_uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    return {
        "storage": storage,
        "io_manager": TensorIOManager(storage=storage),
        **_compute_and_source(env),
        "mlflow": MlflowTracking(
            tracking_uri=tracking_uri or f"sqlite:///{root / 'mlflow.db'}",
            # beside the SQLite store; a tracking server named in MLFLOW_TRACKING_URI decides for itself
            artifact_location=None if tracking_uri else (root / "mlartifacts").as_uri(),
            ui_url=env.get("MLFLOW_UI_URL", ""),
        ),
        "slack": slack_alerts(env),
    }


def prod_resources(env: Mapping[str, str] = os.environ, branch: str | None = None) -> dict[str, object]:
    """S3 (`S3_BUCKET`, `S3_PREFIX`) for everything, an MLflow tracking server (`MLFLOW_TRACKING_URI`),
    the GPU when present. `branch` isolates a branch deployment under its own prefix and MLflow names.

    `S3_BUCKET` and `MLFLOW_TRACKING_URI` are `dg.EnvVar`s: read when a step starts, never shown in the
    UI; a missing one fails that step with a message naming it. AWS credentials are boto3's business.
    """
    # dagster-aws and boto3 (seconds to import) only for prod and branch: kept off dev's code location load
    from mnist_dagster.resources.s3 import S3Resource, S3StorageResource

    prefix = (env.get("S3_PREFIX", "").strip().strip("/")) or DEFAULT_S3_PREFIX
    mlflow_name = MLFLOW_NAME
    if branch:
        prefix, mlflow_name = f"{prefix}/branches/{branch}", f"{MLFLOW_NAME}-{branch}"
    storage: StorageResource = S3StorageResource(
        bucket=dg.EnvVar("S3_BUCKET"), prefix=prefix, s3=S3Resource(region_name=env.get("AWS_REGION") or None)
    )
    return {
        "storage": storage,
        "io_manager": TensorIOManager(storage=storage),
        **_compute_and_source(env),
        "mlflow": MlflowTracking(
            tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
            experiment_name=mlflow_name,
            registered_model_name=mlflow_name,
            ui_url=env.get("MLFLOW_UI_URL", ""),
        ),
        "slack": slack_alerts(env),
    }


def resources_for(deployment: str, env: Mapping[str, str] = os.environ) -> dict[str, object]:
    if deployment == "dev":
        return dev_resources(env)
    if deployment == "prod":
        return prod_resources(env)
    if deployment == "branch":
        return prod_resources(env, branch=branch_slug(env))
    raise ValueError(f"unknown deployment {deployment!r}; expected one of {', '.join(DEPLOYMENTS)}")


EXECUTORS = ("default", "k8s")


def executor_name(env: Mapping[str, str] = os.environ) -> str:
    """`MNIST_EXECUTOR`: `default` (unset) or `k8s`; anything else stops the load, naming the variable."""
    name = env.get("MNIST_EXECUTOR", "").strip() or "default"
    if name not in EXECUTORS:
        raise ValueError(f"MNIST_EXECUTOR={name!r} is not one of {', '.join(EXECUTORS)} (unset means default)")
    return name


def executor_for(deployment: str, env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    """`default`: dev runs every step in the run's own process, so torch, MLflow and the data load once per
    run; prod and branch run a process per step, so a training step's GPU memory is released when it ends
    (and the sweep's candidates train side by side, as many as the `training` pool allows).
    `k8s` (`MNIST_EXECUTOR=k8s`): dagster-k8s's `k8s_job_executor`, a Kubernetes Job per step, shaped by
    each op's `dagster-k8s/config` tag (`GPU_TRAINING_POD` for the trainings) and the executor's run config.
    """
    if executor_name(env) == "k8s":
        from dagster_k8s import k8s_job_executor  # imported only when chosen: it brings the Kubernetes client

        return k8s_job_executor
    return dg.in_process_executor if deployment == "dev" else dg.multiprocess_executor
