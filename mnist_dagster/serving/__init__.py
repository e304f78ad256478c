"""Inference without Dagster: the serving bundle, MNIST-style preprocessing, batch scoring, the HTTP service.

Where things live in the store (a local folder in dev, an S3 prefix in prod) is named once, here, so
the Dagster assets and the `mnist-dagster serve` process agree without importing each other.
"""

SERVING_ROOT = "serving"  # bundles the HTTP service serves: <root>/<version>/..., <root>/CURRENT.json
INBOX_PREFIX = "inbox"  # images waiting for the nightly batch: *.png, *.jpg, *.npz
PREDICTIONS_PREFIX = "predictions"  # the nightly batch's Parquet tables and its ledger
PREDICTION_LOG_PREFIX = "prediction_log"  # what the HTTP service served, as JSON lines
