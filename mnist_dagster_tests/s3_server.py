"""A real S3 API for the prod tests: moto's server on 127.0.0.1, reached over HTTP like any S3.

The fixtures (`s3_endpoint`, `prod_env`) reach every test through `pytest_plugins` in `conftest.py`;
tests import only the helpers (`s3_client`, `bucket_keys`). The environment is made hermetic: dummy
credentials, no AWS config files, no instance metadata.
"""

import uuid
from pathlib import Path

import pytest

#: Variables from the developer's shell that would change what boto3 or the resources do.
AWS_LEAKS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """`http://127.0.0.1:<free port>` of a moto S3 server that lives for the test session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str):
    """A client for test assertions, independent of the code under test."""
    import boto3

    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)


def bucket_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def hermetic_aws(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """No shell credentials, profiles, config files or EC2 metadata lookups leak into a test."""
    for name in AWS_LEAKS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def prod_env(s3_endpoint, fake_mirror, tmp_path, monkeypatch) -> dict[str, str]:
    """A prod deployment against the moto server: a fresh bucket, dummy credentials, MLflow in a temp
    SQLite file. Also set in `os.environ`, because `dg.EnvVar` reads the process environment."""
    mirror, _ = fake_mirror
    bucket = f"mnist-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    env = {
        "DAGSTER_DEPLOYMENT": "prod",
        "S3_BUCKET": bucket,
        "S3_PREFIX": "mnist-dagster",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MNIST_MIRRORS": str(mirror),
        "MNIST_DEVICE": "cpu",
    }
    hermetic_aws(monkeypatch, tmp_path)
    unset = ("MNIST_DATA_DIR", "DAGSTER_CLOUD_DEPLOYMENT_NAME", "DAGSTER_CLOUD_IS_BRANCH_DEPLOYMENT", "MLFLOW_UI_URL")
    for name in unset:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A database tracking URI has no server to hold artifacts: MLflow then writes ./mlruns, so keep it here.
    monkeypatch.chdir(tmp_path)
    return env
