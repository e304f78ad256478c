"""The map of the store: every key prefix the pipeline and the server read or write, named once.

The store is a local folder in dev (`MNIST_DATA_DIR`, else `data/`) and `s3://$S3_BUCKET/$S3_PREFIX/` in
prod; these names are relative to it. Plain Python: the assets, sensors, resources, the serving process
and the benchmarks all import it, and none of them writes a prefix of its own.

    assets/<asset key>.pt              asset values (the IO manager): tensors and checkpoints
    op_outputs/<run>/<step>/...pt      values passed between the steps of an op job (the sweep)
    cache/<name>/                      local working folders (downloads), dev only; prod uses the temp dir
    landing/*.npz                      new labelled batches for training (images uint8 N x 28 x 28, labels)
    models/<v>/model.onnx, bundle.json   every model bundle that passed the gate, immutable, by version
    deployment.json                    THE deployment record: production, challenger, strategy, share, trial,
                                       history (lifecycle/record.py); every reader follows it, nothing is copied
    inbox/                             images waiting for the nightly batch (*.png, *.jpg, *.npz)
    predictions/                       the nightly batch's Parquet tables (scored/, rejected/) and its ledger
    prediction_log/                    what the HTTP endpoint answered, as JSON lines
    feedback/                          true labels clients sent for earlier predictions, as JSON lines
    monitoring/drift-reference/<v>.json   what model version v's traffic is compared with (ml/drift.py)
    monitoring/prediction-drift-cursor.json   the traffic prediction_drift has already judged
    monitoring/feedback-landed.json    the feedback labels already written to landing/ (feedback_to_landing)
"""

ASSETS_PREFIX = "assets"
OP_OUTPUTS_PREFIX = "op_outputs"
CACHE_PREFIX = "cache"
LANDING_PREFIX = "landing"
MODELS_PREFIX = "models"
DEPLOYMENT_KEY = "deployment.json"
INBOX_PREFIX = "inbox"
PREDICTIONS_PREFIX = "predictions"
PREDICTION_LOG_PREFIX = "prediction_log"
FEEDBACK_PREFIX = "feedback"
MONITORING_PREFIX = "monitoring"
SCORED_PREFIX = f"{PREDICTIONS_PREFIX}/scored"  # the nightly batch's predictions, Hive-style partitions
REJECTED_PREFIX = f"{PREDICTIONS_PREFIX}/rejected"  # and the inputs it refused, with why
INBOX_LEDGER_KEY = f"{PREDICTIONS_PREFIX}/ledger.json"  # every inbox file already scored, by content
FEEDBACK_BATCH_PREFIX = f"{LANDING_PREFIX}/feedback-"  # labelled batches made from client feedback
DRIFT_CURSOR_KEY = f"{MONITORING_PREFIX}/prediction-drift-cursor.json"
FEEDBACK_LANDED_KEY = f"{MONITORING_PREFIX}/feedback-landed.json"


def asset_key_path(asset_path: list[str] | tuple[str, ...]) -> str:
    """Where the IO manager keeps an asset's value: `assets/<key parts>.pt`."""
    return f"{ASSETS_PREFIX}/{'/'.join(asset_path)}.pt"


def op_output_path(identifier: list[str]) -> str:
    """Where the IO manager keeps an op's output: `op_outputs/<run id>/<step>/<output>[/<mapping key>].pt`."""
    return f"{OP_OUTPUTS_PREFIX}/{'/'.join(identifier)}.pt"


def bundle_prefix(version: str) -> str:
    """Where model version `version`'s bundle lives (written once, never changed)."""
    return f"{MODELS_PREFIX}/{version}"


def drift_reference_key(version: str) -> str:
    """Where model version `version`'s drift reference lives: written when it becomes production."""
    return f"{MONITORING_PREFIX}/drift-reference/{version}.json"
