"""Inference from the production model only: the nightly batch over the inbox, the real-time endpoint, and
the daily report that judges a challenger on the endpoint's live traffic.

Dagster produces and publishes; a small HTTP service (`mnist-dagster serve`) serves. Both read the
bundle that `production_digit_classifier` deployed past the gate, never a candidate. The work itself
lives in `mnist_dagster.serving` (no Dagster there); these assets run it and describe what happened.
"""

import dagster as dg
from pydantic import Field

from mnist_dagster import ml
from mnist_dagster.assets.automation import RETRAIN_ON_NEW_DATA, TRANSIENT_IO_RETRY
from mnist_dagster.assets.deployment_ops import announce_production
from mnist_dagster.assets.metadata import png_markdown, table
from mnist_dagster.resources.mlflow import MlflowTracking
from mnist_dagster.resources.serving import ServingEndpoint
from mnist_dagster.resources.storage import StorageResource
from mnist_dagster.digits import IMAGE_SIDE
from mnist_dagster.layout import DEPLOYMENT_KEY
from mnist_dagster.lifecycle import check, deploy
from mnist_dagster.lifecycle.record import read_record
from mnist_dagster.scoring import bundle
from mnist_dagster.resources import serving as client
from mnist_dagster.scoring.batch import BatchResult, InboxPlan, commit_shards, plan_shards, score_inbox, score_shard


def _production_bundle(storage: StorageResource) -> bundle.Bundle:
    production = deploy.production_bundle(storage.open())
    if production is None:
        raise dg.Failure(
            "No production model yet: materialize production_digit_classifier first "
            "(it deploys a trained model once it passes the accuracy gate).",
            allow_retries=False,
        )
    return production


class BatchPredictionConfig(dg.Config):
    low_confidence_threshold: float = 0.9  # predictions below this confidence are counted and shown
    low_confidence_grid: int = 32  # how many of the least confident images the grid shows


@dg.asset(
    group_name="inference",
    kinds={"onnx", "parquet"},
    deps=["production_digit_classifier"],
    retry_policy=TRANSIENT_IO_RETRY,  # inbox reads and Parquet writes go to S3 in prod
    pool="batch_inference",  # one batch at a time: two would both score the same new inbox files
)
def batch_digit_predictions(
    context: dg.AssetExecutionContext, config: BatchPredictionConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Scores every image that arrived in the inference inbox since the previous run with the production
    model, and writes a Parquet table of predictions (and one of rejected inputs).

    Inbox (`inbox/` in the store): PNG/JPEG files, and `.npz` batches with `images` uint8 N x 28 x 28.
    Nothing is scored twice: a ledger remembers each (file, content) already done. See
    `mnist_dagster/scoring/batch.py` for the formats and the ledger.
    """
    predictor = bundle.Predictor(_production_bundle(storage))
    store = storage.open()
    result = score_inbox(store, predictor, context.run_id)
    for row in result.rejected.itertuples():
        context.log.warning(f"Rejected {row.input_id}: {row.reason}")
    common = {"model_version": predictor.version, "inbox_files": result.inbox_objects, "new_files": result.new_inputs}
    if result.new_inputs == 0:
        status = (
            "inbox is empty"
            if result.inbox_objects == 0
            else f"nothing new: all {result.inbox_objects} inbox files were scored by earlier runs"
        )
        context.log.info(f"No new inputs ({status}); nothing to score.")
        return dg.MaterializeResult(metadata={**common, "status": status, "scored": 0, "rejected": 0})

    predictions = result.predictions
    low = predictions["confidence"] < config.low_confidence_threshold
    histogram = predictions["digit"].value_counts().reindex(range(10), fill_value=0)
    metadata = {
        **common,
        "status": f"scored {len(predictions)} images from {result.new_inputs} new files",
        "scored": len(predictions),
        "rejected": len(result.rejected),
        "class_histogram": table([{"digit": d, "count": int(c)} for d, c in histogram.items()], ["digit", "count"]),
        "low_confidence": int(low.sum()),
        "low_confidence_threshold": config.low_confidence_threshold,
        "images_per_second": round(result.images_per_second, 1),
        "seconds": round(result.seconds, 3),
    }
    if result.predictions_key:
        metadata["predictions"] = dg.MetadataValue.path(store.uri(result.predictions_key))
    if result.rejected_key:
        metadata["rejected_inputs"] = dg.MetadataValue.path(store.uri(result.rejected_key))
        metadata["rejections"] = table(result.rejected.head(50).to_dict("records"), ["input_id", "reason"])
    if low.any():
        metadata["low_confidence_digits"] = _low_confidence_grid(result, config.low_confidence_grid)
    context.log.info(
        metadata["status"] + f", rejected {len(result.rejected)}, {result.images_per_second:,.0f} images/s"
    )
    return dg.MaterializeResult(metadata=metadata)


class BatchFanOutConfig(dg.Config):
    shards: int = Field(4, ge=1, description="at most this many parallel scoring steps (a process, or a pod on k8s, each)")


@dg.op(out={"shards": dg.DynamicOut(dict), "plan": dg.Out(dict)}, pool="batch_inference")
def plan_batch_shards(context: dg.OpExecutionContext, config: BatchFanOutConfig, storage: StorageResource):
    """What is new in the inbox (as `batch_digit_predictions` sees it), split into shards balanced by bytes;
    the production version is fixed here, so every shard scores with the same model."""
    version = _production_bundle(storage).version
    plan = plan_shards(storage.open(), config.shards)
    context.log.info(
        f"{sum(len(shard) for shard in plan.shards)} new of {plan.inbox_objects} inbox files in {len(plan.shards)} shards"
    )
    yield dg.Output({"inbox_objects": plan.inbox_objects, "seen": plan.seen, "model_version": version}, "plan")
    for index, files in enumerate(plan.shards):
        yield dg.DynamicOutput({"index": index, "files": files, "model_version": version}, f"shard_{index}", "shards")


@dg.op(retry_policy=TRANSIENT_IO_RETRY)
def score_batch_shard(context: dg.OpExecutionContext, shard: dict, storage: StorageResource) -> dict:
    """Score one shard with the planned production version; its own Parquet file, no ledger write."""
    store = storage.open()
    predictor = bundle.Predictor(bundle.load(store, shard["model_version"]))
    result, done = score_shard(store, predictor, shard["files"], context.run_id, shard["index"])
    context.log.info(
        f"shard {shard['index']}: {len(result.predictions)} images from {len(shard['files'])} files, "
        f"{result.images_per_second:,.0f} images/s"
    )
    return {
        "index": shard["index"], "done": done, "scored": len(result.predictions), "rejected": len(result.rejected),
        "images_per_second": round(result.images_per_second, 1), "seconds": round(result.seconds, 3),
        "predictions": result.predictions_key,
    }  # fmt: skip


@dg.op(pool="batch_inference")
def commit_batch_ledger(
    context: dg.OpExecutionContext, plan: dict, scored: list[dict], storage: StorageResource
) -> None:
    """The ledger, written once after every shard's tables, and `batch_digit_predictions`'s materialization."""
    store = storage.open()
    commit_shards(store, InboxPlan(plan["inbox_objects"], [], plan["seen"]), [part["done"] for part in scored])
    rows = sorted(({k: v for k, v in part.items() if k != "done"} for part in scored), key=lambda row: row["index"])
    metadata = {
        "model_version": plan["model_version"],
        "inbox_files": plan["inbox_objects"],
        "new_files": sum(len(part["done"]) for part in scored),
        "shards": len(rows),
        "scored": sum(row["scored"] for row in rows),
        "rejected": sum(row["rejected"] for row in rows),
        "status": f"scored {sum(row['scored'] for row in rows)} images in {len(rows)} parallel shards",
    }
    if rows:
        metadata["min_images_per_second_per_worker"] = min(row["images_per_second"] for row in rows)
        metadata["per_shard"] = table(rows, ["index", "scored", "rejected", "images_per_second", "seconds", "predictions"])
    context.log_event(dg.AssetMaterialization("batch_digit_predictions", metadata=metadata))


@dg.graph
def batch_fanout():
    """The nightly batch for a large backlog: plan -> one scoring step per shard, in parallel -> one ledger."""
    plan_and_shards = plan_batch_shards()
    commit_batch_ledger(plan_and_shards.plan, plan_and_shards.shards.map(score_batch_shard).collect())


def _low_confidence_grid(result: BatchResult, count: int) -> dg.MarkdownMetadataValue:
    """The least confident predictions, captioned `digit (confidence)`."""
    worst = result.predictions["confidence"].to_numpy().argsort()[:count]
    rows = result.predictions.iloc[worst]
    captions = [f"{d} ({c:.0%})" for d, c in zip(rows["digit"], rows["confidence"], strict=True)]
    png = ml.plots.digit_grid_png(result.pixels[worst], captions)
    return png_markdown(png, "least confident predictions: predicted digit (confidence)")


class ServingCheckConfig(dg.Config):
    http_check_images: int = 100  # test images sent to the running server, when there is one
    http_timeout_seconds: float = 60.0  # how long the running server may take to pick up the new version


@dg.asset(
    group_name="inference",
    kinds={"onnx", "fastapi"},
    deps=["production_digit_classifier"],
    retry_policy=TRANSIENT_IO_RETRY,
    # Follow every new deployment; raw_mnist_data only lends its test images, it is no trigger.
    automation_condition=RETRAIN_ON_NEW_DATA.ignore(dg.AssetSelection.assets("raw_mnist_data")),
)
def digit_predictions(
    context: dg.AssetExecutionContext,
    config: ServingCheckConfig,
    storage: StorageResource,
    serving_endpoint: ServingEndpoint,
    raw_mnist_data: dict,
) -> dg.MaterializeResult:
    """The real-time endpoint: `mnist-dagster serve` follows the deployment record by itself (production,
    challenger, routing), loading the immutable bundles it names without a restart; nothing is copied.

    The gate already sent held-out images through the serving path before the record flipped. Here, when
    `MNIST_SERVING_URL` names a running server, it must serve the production version within the timeout
    and answer the model's own digits; the metadata says what the endpoint serves and how traffic is split.
    """
    store = storage.open()
    record = read_record(store)
    production = _production_bundle(storage)
    routing = record.routing
    recorded = production.manifest.get("test_accuracy")
    metadata = {
        "model_version": production.version,
        "challenger_version": record.challenger or "none",
        "routing": f"{routing.strategy} (challenger share {routing.challenger_traffic})" if record.challenger else "production only",
        "trial_id": record.trial_id or "none",
        "deployment_record": dg.MetadataValue.path(store.uri(DEPLOYMENT_KEY)),
        "recorded_test_accuracy": recorded if recorded is not None else "unknown",
    }
    if serving_endpoint.configured:
        images = raw_mnist_data["test_images"][: config.http_check_images].numpy()
        digits = bundle.Predictor(production).predict_proba(images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).astype("float32") / 255).argmax(1)
        metadata |= _check_live_server(context, serving_endpoint.url, production.version, images, digits, config)
    else:
        metadata["http_check"] = "skipped: no running server to check (MNIST_SERVING_URL is not set)"
    served = production.version + (f"+challenger-{record.challenger}-{routing.strategy}" if record.challenger else "")
    context.log.info(f"The endpoint follows {store.uri(DEPLOYMENT_KEY)}: production {production.version}, {metadata['routing']}")
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(served))


def _check_live_server(context, url: str, version: str, images, digits, config: ServingCheckConfig) -> dict:
    """The running server serves `version` within the timeout and gives the same digits as the model."""
    count = config.http_check_images
    try:
        live = client.check_live_server(url, version, images[:count], digits[:count], config.http_timeout_seconds)
    except (client.LiveServerError, OSError) as error:
        # Already waited http_timeout_seconds; a retry would only repeat the wait.
        raise dg.Failure(f"HTTP check of {url} failed: {error}", allow_retries=False) from error
    context.log.info(f"{url} serves version {version} and agrees on {live.images} test images")
    return {
        "http_check": f"{url} serves version {version}",
        "http_check_images": live.images,
        "http_latency_p50_ms": check.percentile_ms(live.latencies, 50),
        "http_latency_p99_ms": check.percentile_ms(live.latencies, 99),
    }


class AbTestConfig(dg.Config):
    """The trial's design (`lifecycle.sequential.Plan`, the same names): fixed before it starts, so no look
    can bend it."""

    alpha: float = Field(0.05, gt=0.0, lt=1.0)  # one-sided: the chance of ever promoting a challenger no better
    max_labelled: int = Field(60_000, ge=1)  # planned labelled requests: information fraction = labelled / this
    max_days: float = Field(30.0, gt=0.0)  # the trial ends by then: keep, unless promoted before
    min_labelled_per_arm: int = Field(200, ge=1)  # below this many labelled requests in either arm: need_more_data
    guardrail_alpha: float = Field(0.05, gt=0.0, lt=1.0)  # error-rate guardrail (always-valid, one-sided)
    latency_ratio: float = Field(1.5, gt=1.0)  # p99 guardrail: breach above this many times production's p99
    auto_promote: bool = False  # on `promote`, make the challenger production (endpoint and MLflow alias too)


AB_TEST_REPORT = dg.AssetKey("ab_test_report")


@dg.asset(
    group_name="inference",
    kinds={"mlflow"},
    deps=["production_digit_classifier"],
    # No retry policy: a retry after a promotion would find no trial and report that instead.
)
def ab_test_report(
    context: dg.AssetExecutionContext, config: AbTestConfig, storage: StorageResource, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    """Champion vs challenger on live traffic, read as often as anyone likes: the trial's predictions since
    the challenger was published, joined with the labels clients sent back, counted per client, and a
    one-sided group-sequential decision (O'Brien-Fleming spending, valid at any number of looks):
    `promote`, `keep` (significantly worse, no difference by the planned end, or a guardrail breached) or
    `need_more_data`. The metadata names the test, the looks so far, the alpha spent and the boundary.

    With `auto_promote`, a `promote` makes the challenger production at once: store, endpoint, MLflow
    aliases. No trial, no traffic or no feedback is a quick successful run that says so.
    """
    from mnist_dagster.lifecycle import ab_report  # scipy (seconds to import): kept off the code location's load

    store = storage.open()
    trial = ab_report.current_trial(store)
    if trial is None:
        status = "no trial running: production serves alone (routing replace), so there is nothing to compare"
        context.log.info(status)
        return dg.MaterializeResult(metadata={"decision": "no trial", "status": status, "promoted": False})
    previous = _previous_report(context.instance, trial.trial_id)
    looks = int(previous["looks"].value) + 1 if previous else 1
    if previous is not None and previous["trial_over"].value:
        return _after_the_end(context, store, mlflow, config, previous, looks)
    predictions, feedback = ab_report.read_trial_logs(store, trial)
    plan = ab_report.Plan(**config.model_dump(exclude={"auto_promote"}))
    report = ab_report.build_report(predictions, feedback, trial, plan, looks)
    context.log.info(f"{report.decision.verdict}: {report.decision.reason}")
    promoted = config.auto_promote and report.decision.verdict == "promote"
    if promoted:
        _promote(context, store, mlflow, report.trial.strategy, report.decision.reason)
    ended = report.decision.trial_over and report.decision.verdict == "keep" and ab_report.end_trial(store, trial)
    if ended:
        context.log.info(f"Trial {trial.trial_id} ended ({report.decision.finding}): production serves alone")
    metadata = _ab_metadata(ab_report.summary(report, plan), config)
    return dg.MaterializeResult(metadata={**metadata, "promoted": promoted, "trial_ended": ended})


def _previous_report(instance: dg.DagsterInstance, trial_id: str) -> dict | None:
    """The latest report's metadata when it was about this trial (it carries the looks so far)."""
    latest = instance.fetch_materializations(AB_TEST_REPORT, limit=1).records
    if not latest:
        return None
    metadata = latest[0].asset_materialization.metadata
    same = "trial_id" in metadata and metadata["trial_id"].value == trial_id and "looks" in metadata
    return dict(metadata) if same else None


def _after_the_end(context, store, mlflow: MlflowTracking, config: AbTestConfig, previous: dict, looks: int):
    """A trial that ended keeps its verdict: a look past the end would spend alpha the design does not
    have. A `promote` left to a person is carried out when the report runs with `auto_promote`."""
    verdict = previous["decision"].value
    promoted = config.auto_promote and verdict == "promote"
    if promoted:
        _promote(context, store, mlflow, previous["strategy"].value, previous["why"].value)
    ended = f"look {previous['looks'].value} ({verdict}: {previous['finding'].value})"
    status = f"the trial ended at {ended}; the verdict stands"
    context.log.info(status)
    return dg.MaterializeResult(metadata={**previous, "looks": looks, "status": status, "promoted": promoted})


def _promote(context: dg.AssetExecutionContext, store, mlflow: MlflowTracking, strategy: str, reason: str) -> None:
    """The challenger becomes production, and the endpoint, the registry and the asset history follow."""
    previous, promoted = deploy.promote_challenger(store)
    why = f"promoted after an A/B test ({strategy}): {reason}"
    announce_production(context, store, mlflow, "promoted", previous, why)
    context.log.info(f"Challenger version {promoted} promoted to production (was {previous})")


def _ab_metadata(summary: dict, config: AbTestConfig) -> dict:
    """What a person reads on the asset page (`ab_report.summary`), with the arms and guardrails as tables."""
    arms, guardrails = summary["arms"], summary["guardrails"]
    return {
        **summary, "arms": table(arms, list(arms[0])),
        "guardrails": table(guardrails, ["guardrail", "breached", "detail"]), "auto_promote": config.auto_promote,
    }  # fmt: skip
