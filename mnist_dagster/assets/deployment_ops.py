"""Changing production outside the gate: a rollback by hand (`rollback_job`), and a promotion after an A/B
test (`ab_test_report` with `auto_promote`).

Either way, the change is one flip of the deployment record (`lifecycle/deploy.py`), which the running
endpoint follows by itself (within its poll interval, about a second, no restart); then the MLflow
registry's `production` alias follows (and `challenger` goes, the trial being over), and a
materialization of `production_digit_classifier` is reported, so its history in the UI says what serves
now, and why, beside the gate's own decisions.
"""

import dagster as dg

from mnist_dagster.layout import bundle_prefix
from mnist_dagster.lifecycle import deploy
from mnist_dagster.lifecycle.record import read_record
from mnist_dagster.resources.mlflow import CHALLENGER_ALIAS, PRODUCTION_ALIAS, MlflowTracking
from mnist_dagster.resources.storage import StorageResource
from mnist_dagster.storage import Store

PRODUCTION_MODEL = dg.AssetKey("production_digit_classifier")


def announce_production(
    context: dg.OpExecutionContext | dg.AssetExecutionContext,
    store: Store,
    mlflow: MlflowTracking,
    decision: str,
    previous: str | None,
    reason: str,
) -> dict:
    """After production changed in the deployment record: move the registry's aliases and report the change
    as a materialization of `production_digit_classifier`; returns its metadata."""
    record = read_record(store)
    production = record.production
    assert production is not None, "announce_production follows a change of production"
    context.log.info(f"Production is version {production} in the deployment record; the endpoint follows it")
    mlflow.set_alias(PRODUCTION_ALIAS, production)
    if record.challenger is None:  # a new production ends any trial: no challenger left to name
        mlflow.delete_alias(CHALLENGER_ALIAS)
    metadata = {
        "deployed": True,
        "decision": decision,
        "reason": reason,
        "model_version": production,
        "previous_version": previous or "none",
        "registered_model": mlflow.registered_model_name,
        "bundle": dg.MetadataValue.path(store.uri(bundle_prefix(production))),
    }
    context.log_event(
        dg.AssetMaterialization(PRODUCTION_MODEL, metadata=metadata, tags={"dagster/data_version": production})
    )
    return metadata


class RollbackConfig(dg.Config):
    version: str | None = None  # the production version to restore; None: the one before the current one
    reason: str = ""  # why, in words, for the asset's history and the Slack message


@dg.op(description="Puts an earlier production version back: store, endpoint, MLflow alias, asset history.")
def roll_back_production(
    context: dg.OpExecutionContext, config: RollbackConfig, storage: StorageResource, mlflow: MlflowTracking
) -> None:
    """Restores a verified earlier bundle as production; a version that does not exist or fails its
    checksum fails the run and changes nothing. Not retried: a second attempt after a success would roll
    back from the restored version."""
    store = storage.open()
    try:
        replaced, restored = deploy.roll_back(store, config.version)
    except deploy.DeploymentError as error:
        raise dg.Failure(f"Not rolled back: {error}. Production is unchanged.", allow_retries=False) from error
    why = config.reason or f"rollback_job run {context.run_id[:8]}"
    context.log.info(f"Production rolled back from version {replaced} to {restored} ({why})")
    try:
        announce_production(context, store, mlflow, "rolled back", replaced, why)
    except Exception as error:
        raise dg.Failure(
            f"Production is now version {restored} in the store, but telling the endpoint or MLflow failed: {error}. "
            "The endpoint follows the record by itself; set the MLflow alias by hand if needed.",
            allow_retries=False,
        ) from error
