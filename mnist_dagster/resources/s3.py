"""Prod storage: an S3 bucket and prefix, reached through dagster-aws's `S3Resource`.

Credentials never enter Dagster config: boto3 takes them from the environment, a profile or the
worker's IAM role, along with `AWS_ENDPOINT_URL` (MinIO, moto, ...). The bucket comes from
`dg.EnvVar("S3_BUCKET")`, resolved when a step starts.
"""

from dagster_aws.s3 import S3Resource

from mnist_dagster.resources.storage import StorageResource
from mnist_dagster.storage import S3Store, Store

_CHECKED: set[tuple[str | None, str, str]] = set()  # (endpoint, bucket, prefix) verified in this process


class S3StorageResource(StorageResource):
    """Everything under `s3://S3_BUCKET/S3_PREFIX/`; the first open in a process checks that it is usable."""

    bucket: str
    prefix: str = "mnist-dagster"
    s3: S3Resource

    def open(self) -> Store:
        store = S3Store(self.s3.get_client(), self.bucket, self.prefix)
        checked = (store.client.meta.endpoint_url, store.bucket, store.prefix)
        if checked not in _CHECKED:
            store.check_access()  # raises StorageSettingsError naming S3_BUCKET / AWS_* variables
            _CHECKED.add(checked)
        return store
