"""Where bytes live, and how they get there durably. Plain Python (boto3 only for S3): the pipeline and the
serving process share it without Dagster.

    store.py     the Store: a local folder in dev, an S3 prefix in prod, behind one small interface
    journal.py   a local append-only journal: whole lines on disk before the caller answers, fsync modes, segments
    shipper.py   moves the journal's sealed segments into the store, one object per day
    jsonl.py     JSON-lines logs written through the journal and read back from the store

`import mnist_dagster.storage` loads the Store only; the journal's modules are imported by whoever writes a log.
"""

from mnist_dagster.storage.store import (
    CHECKOUT_ROOT,
    LocalStore,
    S3Store,
    StorageSettingsError,
    Store,
    StoredObject,
    WriteConflict,
    default_data_dir,
    open_store,
    s3_client,
)

__all__ = [
    "CHECKOUT_ROOT",
    "LocalStore",
    "S3Store",
    "StorageSettingsError",
    "Store",
    "StoredObject",
    "WriteConflict",
    "default_data_dir",
    "open_store",
    "s3_client",
]
