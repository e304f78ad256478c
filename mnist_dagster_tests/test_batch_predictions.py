"""`batch_digit_predictions` on a small inbox: scores what is new, skips what it scored, rejects the malformed."""

import io
import os

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from mnist_dagster.assets.prediction_assets import batch_digit_predictions
from mnist_dagster.layout import INBOX_PREFIX
from mnist_dagster.lifecycle import deploy
from mnist_dagster.scoring import bundle
from mnist_dagster.scoring.batch import LEDGER_KEY, PREDICTION_COLUMNS, REJECTED_COLUMNS
from mnist_dagster.scoring.preprocess import encode_png
from mnist_dagster.storage import LocalStore
from mnist_dagster_tests.support import generated_digits


@pytest.fixture
def store(dev_env) -> LocalStore:
    return LocalStore(dev_env["MNIST_DATA_DIR"])


@pytest.fixture
def production(store, generated_bundle) -> bundle.Bundle:
    deploy.make_production(store, generated_bundle, "test")
    return generated_bundle


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def run_batch(resources, instance, threshold: float = 0.9, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    config = {"ops": {"batch_digit_predictions": {"config": {"low_confidence_threshold": threshold}}}}
    return dg.materialize(
        [batch_digit_predictions],
        resources=resources,
        instance=instance,
        run_config=config,
        raise_on_error=raise_on_error,
    )


def metadata_of(result: dg.ExecuteInProcessResult) -> dict:
    return {
        key: value.value
        for key, value in result.asset_materializations_for_node("batch_digit_predictions")[0].metadata.items()
    }


def scored_table(store: LocalStore, metadata: dict) -> pd.DataFrame:
    return pd.read_parquet(metadata["predictions"])


def test_scores_new_inputs_once_and_rejects_the_malformed(dev_test_resources, instance, store, production):
    images, labels = generated_digits(40, seed=7)
    images[5] = 0  # blank: rejected on its own, the rest of the file is scored
    store.write_bytes(f"{INBOX_PREFIX}/2024-06-01/batch.npz", npz_bytes(images=images))
    pngs, png_labels = generated_digits(3, seed=8)
    for index, image in enumerate(pngs):
        store.write_bytes(f"{INBOX_PREFIX}/scans/digit-{index}.png", encode_png(image))
    store.write_bytes(f"{INBOX_PREFIX}/garbage.npz", b"not a zip file")
    store.write_bytes(f"{INBOX_PREFIX}/floats.npz", npz_bytes(images=np.zeros((2, 28, 28), np.float32)))
    store.write_bytes(f"{INBOX_PREFIX}/truncated.png", encode_png(pngs[0])[:200])
    store.write_bytes(f"{INBOX_PREFIX}/notes.txt", b"hello")

    first = run_batch(dev_test_resources, instance, threshold=1.01)  # every prediction counts as low-confidence
    assert first.success
    metadata = metadata_of(first)
    assert metadata["scored"] == 39 + 3
    assert metadata["rejected"] == 1 + 4
    assert metadata["model_version"] == production.version
    assert metadata["low_confidence"] == 42
    assert "data:image/png;base64," in metadata["low_confidence_digits"]
    assert metadata["images_per_second"] > 0
    histogram = {row.data["digit"]: row.data["count"] for row in metadata["class_histogram"].records}
    assert sum(histogram.values()) == 42

    table = scored_table(store, metadata)
    assert list(table.columns) == PREDICTION_COLUMNS
    assert (table["model_version"] == production.version).all()
    assert (table["digit"] != table["runner_up"]).all()
    assert (table["confidence"] >= table["runner_up_confidence"]).all()
    by_id = table.set_index("input_id")["digit"]
    expected = {f"{INBOX_PREFIX}/2024-06-01/batch.npz#{i}": labels[i] for i in range(40) if i != 5}
    expected |= {f"{INBOX_PREFIX}/scans/digit-{i}.png": png_labels[i] for i in range(3)}
    assert set(by_id.index) == set(expected)
    accuracy = np.mean([by_id[input_id] == label for input_id, label in expected.items()])
    assert accuracy >= 0.95  # the generated digits are easy: a working model gets them right

    rejected = pd.read_parquet(metadata["rejected_inputs"]).set_index("input_id")["reason"]
    assert list(pd.read_parquet(metadata["rejected_inputs"]).columns) == REJECTED_COLUMNS
    assert "blank image" in rejected[f"{INBOX_PREFIX}/2024-06-01/batch.npz#5"]
    assert "not a readable .npz" in rejected[f"{INBOX_PREFIX}/garbage.npz"]
    assert "uint8 N x 28 x 28" in rejected[f"{INBOX_PREFIX}/floats.npz"]
    assert "corrupt or truncated" in rejected[f"{INBOX_PREFIX}/truncated.png"]
    assert "unsupported file type" in rejected[f"{INBOX_PREFIX}/notes.txt"]

    second = run_batch(dev_test_resources, instance)
    assert second.success
    again = metadata_of(second)
    assert again["scored"] == 0 and again["rejected"] == 0
    assert again["status"].startswith("nothing new")


def test_a_changed_file_is_scored_again_and_a_touched_one_is_not(dev_test_resources, instance, store, production):
    first_images, _ = generated_digits(2, seed=11)
    store.write_bytes(f"{INBOX_PREFIX}/a.png", encode_png(first_images[0]))
    store.write_bytes(f"{INBOX_PREFIX}/b.png", encode_png(first_images[1]))
    assert metadata_of(run_batch(dev_test_resources, instance))["scored"] == 2

    changed, changed_labels = generated_digits(1, seed=12)
    store.write_bytes(f"{INBOX_PREFIX}/a.png", encode_png(changed[0]))  # new content under the same key
    later = os.stat(store.uri(f"{INBOX_PREFIX}/b.png")).st_mtime_ns + 10**9
    os.utime(store.uri(f"{INBOX_PREFIX}/b.png"), ns=(later, later))  # touched, same bytes
    store.write_bytes(f"{INBOX_PREFIX}/c.npz", npz_bytes(images=generated_digits(4, seed=13)[0]))

    metadata = metadata_of(run_batch(dev_test_resources, instance))
    assert metadata["scored"] == 1 + 4
    table = scored_table(store, metadata)
    assert set(table["input_key"]) == {f"{INBOX_PREFIX}/a.png", f"{INBOX_PREFIX}/c.npz"}
    row = table.set_index("input_id").loc[f"{INBOX_PREFIX}/a.png"]
    assert row["digit"] == changed_labels[0]
    assert LEDGER_KEY in {item.key for item in store.list("predictions")}


def test_empty_inbox_is_a_successful_run_that_says_so(dev_test_resources, instance, store, production):
    result = run_batch(dev_test_resources, instance)
    assert result.success
    metadata = metadata_of(result)
    assert metadata["status"] == "inbox is empty"
    assert metadata["scored"] == 0
    assert not store.list("predictions/scored")


def test_without_a_production_model_it_fails_saying_why(dev_test_resources, instance, store):
    store.write_bytes(f"{INBOX_PREFIX}/a.png", encode_png(generated_digits(1, seed=3)[0][0]))
    result = run_batch(dev_test_resources, instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert "No production model yet" in failure.message
    assert not store.exists(LEDGER_KEY)  # nothing recorded as scored


def test_real_digits_scored_from_npz_and_drawings(dev_test_resources, instance, store, real_bundle, real_digits):
    """Real MNIST digits, as an `.npz` batch and as black-on-white drawings of another size."""
    from PIL import Image

    deploy.make_production(store, real_bundle, "test")
    images, labels = real_digits
    store.write_bytes(f"{INBOX_PREFIX}/test.npz", npz_bytes(images=images[:500]))
    for index in range(500, 540):
        drawing = Image.fromarray(255 - images[index]).resize((90, 90), Image.Resampling.BILINEAR)
        store.write_bytes(f"{INBOX_PREFIX}/drawings/{index}.png", encode_png(np.asarray(drawing)))

    metadata = metadata_of(run_batch(dev_test_resources, instance))
    assert metadata["scored"] == 540 and metadata["rejected"] == 0
    table = scored_table(store, metadata).set_index("input_id")["digit"]
    npz_accuracy = np.mean([table[f"{INBOX_PREFIX}/test.npz#{i}"] == labels[i] for i in range(500)])
    drawing_accuracy = np.mean([table[f"{INBOX_PREFIX}/drawings/{i}.png"] == labels[i] for i in range(500, 540)])
    assert npz_accuracy >= real_bundle.manifest["test_accuracy"] - 0.03
    assert drawing_accuracy >= 0.85
