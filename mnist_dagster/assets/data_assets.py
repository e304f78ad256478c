"""Data: the verified MNIST files (plus any landed labelled batches), then normalised, split tensors.

The science lives in `mnist_dagster.ml`, whose submodules load on first use (`ml.data`, and torch with
it, when a step runs), so loading the code location stays fast.
"""

from typing import TYPE_CHECKING, NamedTuple

import dagster as dg

from mnist_dagster import ml
from mnist_dagster.assets.automation import RETRAIN_ON_NEW_DATA, TRANSIENT_IO_RETRY
from mnist_dagster.assets.metadata import png_markdown
from mnist_dagster.layout import LANDING_PREFIX
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster.resources.storage import StorageResource

if TYPE_CHECKING:
    import torch

PROCESSED_CHECKS = ["shapes", "label_range", "class_balance", "no_nan"]


@dg.asset(
    group_name="data",
    kinds={"pytorch"},
    code_version="1",
    retry_policy=TRANSIENT_IO_RETRY,  # mirror downloads and S3 reads fail transiently
)
def raw_mnist_data(context: dg.AssetExecutionContext, mnist_source: MnistSource, storage: StorageResource) -> dg.Output:
    """The four MNIST files, md5-verified, as uint8 tensors; plus every valid labelled batch landed so far.

    The parsed arrays are cached beside the downloads as memory-mapped `.npy`, named by the md5 of the
    file they came from and checked against their own sha256 on every read (`ml.data.read_mnist_cached`).
    Its data version is a hash of the files and batches, so re-running on the same data is not new data.
    """
    folder = storage.scratch_dir("mnist")
    fetched = ml.data.fetch_mnist(mnist_source.sources(), folder, mnist_source.checksums())
    tensors = ml.data.read_mnist_cached(folder, fetched.md5s)  # parsed arrays kept by md5, digest-checked
    landed, rejected = _read_landed_batches(storage, context)
    if landed:
        tensors = ml.data.with_batches(tensors, [batch.images for batch in landed], [batch.labels for batch in landed])
    version = ml.data.content_hash(*fetched.md5s.values(), *(f"{batch.key}:{batch.digest}" for batch in landed))
    return dg.Output(
        {**tensors, "source": fetched.source, "data_version": version},  # provenance travels with the data
        data_version=dg.DataVersion(version),
        metadata={
            "source": fetched.source,
            "train_images": len(tensors["train_labels"]),
            "test_images": len(tensors["test_labels"]),
            "landed_batches": len(landed),
            "landed_images": sum(len(batch.labels) for batch in landed),
            "rejected_batches": dg.MetadataValue.json(rejected),
            "md5": dg.MetadataValue.json(fetched.md5s),
            "data_version": version,
        },
    )


class LandedBatch(NamedTuple):
    key: str
    digest: str
    images: "torch.Tensor"  # uint8 (N, 28, 28)
    labels: "torch.Tensor"  # int64 (N,)


def _read_landed_batches(
    storage: StorageResource, context: dg.AssetExecutionContext
) -> tuple[list[LandedBatch], dict[str, str]]:
    """Every valid `.npz` in the landing area; invalid ones are reported and skipped, never fatal."""
    store = storage.open()
    landed, rejected = [], {}
    for item in store.list(LANDING_PREFIX):
        if not item.key.endswith(".npz"):
            continue
        payload = store.read_bytes(item.key)
        try:
            images, labels = ml.data.read_labelled_batch(payload)
        except ml.data.LabelledBatchError as error:
            rejected[item.key] = str(error)
            context.log.warning(f"Skipping landed batch {item.key}: {error}")
            continue
        landed.append(LandedBatch(item.key, ml.data.content_hash(payload), images, labels))
    return landed, rejected


class ProcessingConfig(dg.Config):
    validation_fraction: float = 1 / 12  # 5,000 of the 60,000 training images
    seed: int = 0
    train_subset: int | None = None  # keep only this many training images (stratified), for fast dev loops


@dg.asset(
    group_name="data",
    kinds={"pytorch"},
    code_version="1",
    automation_condition=RETRAIN_ON_NEW_DATA,
    check_specs=[dg.AssetCheckSpec(name, asset="processed_mnist_data", blocking=True) for name in PROCESSED_CHECKS],
)
def processed_mnist_data(context: dg.AssetExecutionContext, config: ProcessingConfig, raw_mnist_data: dict):
    """Images scaled to [0, 1] and standardised with the training split's mean and std; a seeded,
    stratified train/validation split of the training images; the 10k test set kept apart."""
    raw = raw_mnist_data
    if config.train_subset:
        labels = raw["train_labels"]
        keep, _ = ml.data.stratified_split(labels, 1 - config.train_subset / len(labels), config.seed)
        raw = {**raw, "train_images": raw["train_images"][keep], "train_labels": raw["train_labels"][keep]}
    split = ml.data.normalise_and_split(raw, config.validation_fraction, config.seed)
    provenance = {key: str(raw.get(key, "unknown")) for key in ("source", "data_version")}
    sample = split.train_images[:32]
    yield dg.Output(
        {**split.as_dict(), **provenance},
        metadata={
            "train_size": len(split.train_labels),
            "val_size": len(split.val_labels),
            "test_size": len(split.test_labels),
            "train_class_counts": dg.MetadataValue.json(ml.data.class_counts(split.train_labels)),
            "mean": split.mean,
            "std": split.std,
            "sample_digits": png_markdown(
                ml.plots.digit_grid_png(sample, [str(int(label)) for label in split.train_labels[:32]]), "sample digits"
            ),
        },
    )
    yield from _check_processed(split)


def _check_processed(split: "ml.data.NormalisedSplit") -> list[dg.AssetCheckResult]:
    """The data contract the model relies on; each check blocks training when it fails."""
    parts = {
        "train": (split.train_images, split.train_labels),
        "val": (split.val_images, split.val_labels),
        "test": (split.test_images, split.test_labels),
    }
    shapes = {name: list(images.shape) for name, (images, _) in parts.items()}
    shapes_ok = all(
        images.shape[1:] == (1, 28, 28) and len(images) == len(labels) and len(labels) > 0 for images, labels in parts.values()
    )
    label_bounds = {name: [int(labels.min()), int(labels.max())] for name, (_, labels) in parts.items()}
    labels_ok = all(0 <= low and high < ml.data.NUM_CLASSES for low, high in label_bounds.values())
    counts = ml.data.class_counts(split.train_labels)
    share = [count / max(1, sum(counts)) for count in counts]
    balanced = min(counts) > 0 and max(share) <= 0.2 and min(share) >= 0.05
    non_finite = {name: ml.data.count_non_finite(images) for name, (images, _) in parts.items()}
    return [
        dg.AssetCheckResult(check_name="shapes", passed=shapes_ok, metadata={"shapes": dg.MetadataValue.json(shapes)}),
        dg.AssetCheckResult(
            check_name="label_range", passed=labels_ok, metadata={"min_max": dg.MetadataValue.json(label_bounds)}
        ),
        dg.AssetCheckResult(
            check_name="class_balance",
            passed=balanced,
            description="every digit is between 5% and 20% of the training split",
            metadata={"min_share": min(share), "max_share": max(share)},
        ),
        dg.AssetCheckResult(
            check_name="no_nan", passed=sum(non_finite.values()) == 0, metadata={"non_finite": dg.MetadataValue.json(non_finite)}
        ),
    ]

