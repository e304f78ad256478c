"""Where bytes live: a local folder in dev, an S3 bucket and prefix in prod, behind one small interface.

Plain Python (boto3 only for S3), so the serving process can read the same store as the pipeline
without importing Dagster. Dagster resources in `mnist_dagster.resources` open these.
Every write is atomic: a reader sees the old object or the new one, never half of one. Both stores
behave alike: a missing key is `FileNotFoundError`, and a misconfigured S3 store fails with a
`StorageSettingsError` that names the environment variable to fix, not a bare boto3 traceback.

One object, the deployment record, is changed by several writers (the gate, the A/B report, a
rollback); for it the stores also offer compare-and-swap: `read_with_tag` returns the bytes and a tag
of what was read, and `write_if` writes only if the object still has that tag (or, with tag None, does
not exist yet), else raises `WriteConflict`. Locally: a lock file around compare + write-then-rename.
On S3: conditional writes (`If-Match` / `If-None-Match: *`), which AWS S3, MinIO and moto honour.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    version: str  # changes whenever the content may have changed (mtime+size locally, ETag on S3)


class StorageSettingsError(RuntimeError):
    """The store cannot be used as configured (bucket, credentials, endpoint); the message says which setting."""


class WriteConflict(RuntimeError):
    """A conditional write lost: the object changed (or appeared) since it was read. Nothing was written."""


class Store(Protocol):
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def read_with_tag(self, key: str) -> tuple[bytes, str]: ...
    def write_if(self, key: str, data: bytes, tag: str | None) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[StoredObject]: ...
    def delete(self, key: str) -> None: ...
    def uri(self, key: str) -> str: ...


class LocalStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"key {key!r} escapes the store root")
        return path

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_with_tag(self, key: str) -> tuple[bytes, str]:
        data = self.read_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def write_if(self, key: str, data: bytes, tag: str | None) -> None:
        """Compare and swap under an exclusive lock on a sidecar file: no two writers (threads or
        processes on this machine) can both see the same `tag` and both write."""
        path = self._path(key)
        with self._locked(path):
            current = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            if current != tag:
                raise WriteConflict(f"{key} changed since it was read (expected {tag}, found {current})")
            self.write_bytes(key, data)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        objects = []
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                stat = path.stat()
                key = path.relative_to(self.root).as_posix()
                objects.append(StoredObject(key, stat.st_size, f"{stat.st_mtime_ns}-{stat.st_size}"))
        return objects

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def uri(self, key: str) -> str:
        return str(self._path(key))


class S3Store:
    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check_access(self) -> None:
        """One cheap listing under the prefix, so a wrong bucket, endpoint or credential fails here,
        with the variable to fix, rather than deep inside a step. Listing is a permission the store
        needs anyway (`list`)."""
        if not self.bucket.strip():
            raise StorageSettingsError("S3_BUCKET is empty: set it to the bucket that holds this deployment's data")
        endpoint = getattr(self.client.meta, "endpoint_url", "?")
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        except NoCredentialsError as error:
            raise StorageSettingsError(
                f"no AWS credentials for S3_BUCKET={self.bucket!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, or give the worker an IAM role)"
            ) from error
        except EndpointConnectionError as error:
            raise StorageSettingsError(
                f"cannot reach the S3 endpoint {endpoint} (AWS_ENDPOINT_URL / AWS_REGION): {error}"
            ) from error
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchBucket", "404"}:
                raise StorageSettingsError(
                    f"S3_BUCKET={self.bucket!r} does not exist at {endpoint}: create it or fix S3_BUCKET"
                ) from error
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}:
                raise StorageSettingsError(
                    f"S3 refused access to s3://{self.bucket}/{self.prefix} ({code}): check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY (or the role) and that they may list, read and write under S3_PREFIX"
                ) from error
            raise StorageSettingsError(f"S3 error on s3://{self.bucket}/{self.prefix} ({code}): {error}") from error
        except BotoCoreError as error:
            raise StorageSettingsError(
                f"S3 client error for S3_BUCKET={self.bucket!r} at {endpoint}: {error}"
            ) from error

    def read_bytes(self, key: str) -> bytes:
        return self.read_with_tag(key)[0]

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)  # S3 PUT is atomic

    def read_with_tag(self, key: str) -> tuple[bytes, str]:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"NoSuchKey", "404"}:
                raise FileNotFoundError(self.uri(key)) from error
            raise
        return answer["Body"].read(), answer["ETag"]

    def write_if(self, key: str, data: bytes, tag: str | None) -> None:
        """S3's conditional PUT: `If-Match: <ETag read>`, or `If-None-Match: *` for a first write. S3 itself
        decides, so two writers on different machines cannot both win."""
        condition = {"IfMatch": tag} if tag is not None else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                raise WriteConflict(f"{self.uri(key)} changed since it was read ({code})") from error
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def list(self, prefix: str) -> list[StoredObject]:
        full_prefix = self._key(prefix.rstrip("/") + "/")
        strip = len(self.prefix) + 1 if self.prefix else 0
        objects = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                objects.append(StoredObject(item["Key"][strip:], item["Size"], item["ETag"].strip('"')))
        return sorted(objects, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"


def s3_client() -> Any:
    """A boto3 S3 client from the environment: credentials, `AWS_ENDPOINT_URL` (boto3 reads both) and
    `AWS_REGION` (botocore itself reads only `AWS_DEFAULT_REGION`)."""
    import boto3  # lazy: boto3 costs ~0.2 s, a tenth of the code location's load, which uses no S3 client

    return boto3.client("s3", region_name=os.environ.get("AWS_REGION") or None)


CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """The dev storage root, shared by the Dagster resources and the serving CLI: `MNIST_DATA_DIR`,
    else `data/` in the checkout (git-ignored), else `./data` where the package is installed rather
    than checked out (a container)."""
    if env.get("MNIST_DATA_DIR"):
        return Path(env["MNIST_DATA_DIR"]).expanduser().resolve()
    in_checkout = (CHECKOUT_ROOT / "pyproject.toml").is_file()
    return (CHECKOUT_ROOT if in_checkout else Path.cwd()).resolve() / "data"


def open_store(location: str) -> Store:
    """`s3://bucket/prefix` (checked on open) or a local folder."""
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        store = S3Store(s3_client(), bucket, prefix)
        store.check_access()
        return store
    return LocalStore(location)
