"""Storage resources: where assets, models, landing and inbox files live, per environment.

Assets ask a `StorageResource` for a `Store` and never build paths or S3 keys themselves.
"""

import tempfile
from pathlib import Path

import dagster as dg
from dagster_aws.s3 import S3Resource

from mnist_dagster.storage import LocalStore, S3Store, Store


class StorageResource(dg.ConfigurableResource):
    """Base type the assets depend on; dev and prod provide a subclass."""

    def open(self) -> Store:
        raise NotImplementedError

    def scratch_dir(self, name: str) -> Path:
        """A local working folder (downloads, decompression) that may be reused between runs."""
        path = Path(tempfile.gettempdir()) / "mnist-dagster" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class LocalStorage(StorageResource):
    """Dev: everything under one local folder (`MNIST_DATA_DIR`)."""

    root: str

    def open(self) -> Store:
        return LocalStore(self.root)

    def scratch_dir(self, name: str) -> Path:
        path = Path(self.root).expanduser() / "cache" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class S3Storage(StorageResource):
    """Prod: everything under `s3://S3_BUCKET/S3_PREFIX/`, through dagster-aws's `S3Resource`."""

    bucket: str
    prefix: str = "mnist-dagster"
    s3: S3Resource

    def open(self) -> Store:
        return S3Store(self.s3.get_client(), self.bucket, self.prefix)
