"""Storage resources: where assets, models, landing and inbox files live, per environment.

Assets ask a `StorageResource` for a `Store` and never build paths or S3 keys themselves. The S3
flavour lives in `mnist_dagster.resources.s3`, imported only by prod, so that loading the dev code
location does not pay for boto3 and dagster-aws.
"""

import tempfile
from pathlib import Path

import dagster as dg

from mnist_dagster.layout import CACHE_PREFIX
from mnist_dagster.storage import LocalStore, Store


class StorageResource(dg.ConfigurableResource):
    """Base type the assets depend on; dev and prod provide a subclass."""

    def open(self) -> Store:
        raise NotImplementedError

    def scratch_dir(self, name: str) -> Path:
        """A local working folder (downloads, decompression) that may be reused between runs."""
        path = Path(tempfile.gettempdir()) / "mnist-dagster" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class LocalStorageResource(StorageResource):
    """Dev: everything under one local folder (`MNIST_DATA_DIR`)."""

    root: str

    def open(self) -> Store:
        return LocalStore(self.root)

    def scratch_dir(self, name: str) -> Path:
        path = Path(self.root).expanduser() / CACHE_PREFIX / name
        path.mkdir(parents=True, exist_ok=True)
        return path
