"""Inference from the production model only: nightly batch scoring and the real-time serving bundle."""


import dagster as dg

from mnist_dagster.assets.model_assets import PRODUCTION_ROOT
from mnist_dagster.resources.storage import StorageResource

SERVING_ROOT = "serving"  # where `mnist-dagster serve` looks for the newest bundle
INBOX_PREFIX = "inbox"  # images waiting for the nightly batch
PREDICTIONS_PREFIX = "predictions"


def _production_predictor(storage: StorageResource):
    from mnist_dagster.serving.bundle import Predictor, load_current

    production = load_current(storage.open(), PRODUCTION_ROOT)
    if production is None:
        raise dg.Failure("No production model yet: materialize production_digit_classifier first (it deploys past the gate).")
    return Predictor(production)


@dg.asset(group_name="inference", kinds={"onnx", "parquet"}, deps=["production_digit_classifier"])
def batch_digit_predictions(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Scores every `.npz` image batch in the inbox with the production model and writes Parquet."""
    import io

    import numpy as np
    import pandas as pd

    predictor = _production_predictor(storage)
    store = storage.open()
    rows = []
    for item in store.list(INBOX_PREFIX):
        with np.load(io.BytesIO(store.read_bytes(item.key)), allow_pickle=False) as npz:
            images = npz["images"]
        probabilities = predictor.predict_proba(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
        for index, row in enumerate(probabilities):
            rows.append({"input_id": f"{item.key}#{index}", "digit": int(row.argmax()), "confidence": float(row.max())})
    frame = pd.DataFrame(rows, columns=["input_id", "digit", "confidence"]).assign(model_version=predictor.version)
    key = f"{PREDICTIONS_PREFIX}/batch-{context.run_id}.parquet"
    store.write_bytes(key, frame.to_parquet(index=False))
    return dg.MaterializeResult(
        metadata={"scored": len(frame), "model_version": predictor.version, "predictions": dg.MetadataValue.path(store.uri(key))}
    )


@dg.asset(group_name="inference", kinds={"onnx"}, deps=["production_digit_classifier"])
def digit_predictions(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    """Publishes the production bundle to the serving location, where `mnist-dagster serve` picks it up."""
    from mnist_dagster.serving import bundle

    predictor = _production_predictor(storage)
    bundle.publish(storage.open(), SERVING_ROOT, predictor.bundle)
    return dg.MaterializeResult(metadata={"model_version": predictor.version}, data_version=dg.DataVersion(predictor.version))
