"""Unit tests of the plain-PyTorch core: fetching, reading, splitting, the model format, training, evaluation."""

import gzip
import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from mnist_dagster.ml import data, evaluate, plots, train
from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster_tests.support import generated_digits, generated_split, serve_folder, write_mnist_mirror


@pytest.fixture
def http_mirror(tmp_path):
    """A real HTTP mirror on 127.0.0.1 serving generated MNIST files; yields (base_url, folder, md5s)."""
    folder = tmp_path / "served"
    md5s = write_mnist_mirror(folder, n_train=200, n_test=50)
    with serve_folder(folder) as url:
        yield url, folder, md5s


def test_fetch_downloads_over_http_and_verifies(http_mirror, tmp_path):
    url, _, md5s = http_mirror
    result = data.fetch_mnist([url], tmp_path / "cache", md5s)
    assert result.source == url
    tensors = data.read_mnist(tmp_path / "cache")
    assert tensors["train_images"].shape == (200, 28, 28) and tensors["train_images"].dtype == torch.uint8
    assert tensors["test_labels"].shape == (50,) and tensors["test_labels"].dtype == torch.int64


def test_read_ignores_a_stale_decompressed_file_in_the_cache(http_mirror, tmp_path):
    """The root cause of prod training other images than dev: the download cache (shared by every prod
    process on a machine) held a decompressed file of another dataset beside the verified `.gz`, and
    reading trusted it. What is read must be what was verified."""
    url, _, md5s = http_mirror
    cache = tmp_path / "cache"
    other = write_mnist_mirror(tmp_path / "other", n_train=30, n_test=10)  # another MNIST-format dataset
    assert other != md5s
    for name in md5s:  # its decompressed files left in the cache by an earlier run
        (cache / name.removesuffix(".gz")).parent.mkdir(parents=True, exist_ok=True)
        (cache / name.removesuffix(".gz")).write_bytes(gzip.decompress((tmp_path / "other" / name).read_bytes()))
    data.fetch_mnist([url], cache, md5s)
    tensors = data.read_mnist(cache)
    expected_images, expected_labels = generated_digits(200, seed=1)  # what write_mnist_mirror serves for train
    assert tensors["train_images"].shape == (200, 28, 28)
    assert torch.equal(tensors["train_images"], torch.from_numpy(expected_images))
    assert torch.equal(tensors["train_labels"], torch.from_numpy(expected_labels).long())


def test_read_idx_refuses_what_is_not_uint8_idx():
    with pytest.raises(ValueError, match="not a uint8 IDX file"):
        data.read_idx(b"\x00\x00\x0d\x01" + (4).to_bytes(4, "big") + b"\x00" * 16, "floats.idx")
    with pytest.raises(ValueError, match="header says"):
        data.read_idx(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00" * 4, "short.idx")


def test_corrupt_download_is_rejected_and_never_lands(http_mirror, tmp_path):
    url, folder, md5s = http_mirror
    corrupt = folder / "train-images-idx3-ubyte.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:-100])  # a truncated, partial file
    cache = tmp_path / "cache"
    with pytest.raises(data.MnistSourceError) as error:
        data.fetch_mnist([url], cache, md5s)
    assert "md5" in str(error.value) and url in str(error.value)
    assert not (cache / "train-images-idx3-ubyte.gz").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".partial")]


def test_falls_back_to_next_source_and_names_every_failure(http_mirror, tmp_path):
    url, _, md5s = http_mirror
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    result = data.fetch_mnist([dead, url], tmp_path / "cache", md5s)
    assert result.source == url
    with pytest.raises(data.MnistSourceError) as error:
        data.fetch_mnist([dead, str(tmp_path / "nowhere")], tmp_path / "other", md5s)
    message = str(error.value)
    assert dead in message and str(tmp_path / "nowhere") in message and "MNIST_MIRRORS" in message


def test_default_sources_are_torchvisions_public_mirrors():
    assert data.parse_sources("") == list(data.DEFAULT_MIRRORS)
    assert data.DEFAULT_MIRRORS[0].startswith("https://") and all("://" in m for m in data.DEFAULT_MIRRORS)
    assert data.parse_sources(" /a , http://b/ ") == ["/a", "http://b/"]
    assert data.MNIST_FILES["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    # copied so that reading MNIST does not import torchvision: still torchvision's own lists
    from torchvision.datasets import MNIST

    assert data.DEFAULT_MIRRORS == tuple(MNIST.mirrors) and data.MNIST_FILES == dict(MNIST.resources)


def test_stratified_split_is_seeded_and_keeps_class_proportions():
    labels = torch.arange(1000) % 10
    train_a, val_a = data.stratified_split(labels, 0.1, seed=3)
    train_b, val_b = data.stratified_split(labels, 0.1, seed=3)
    assert torch.equal(train_a, train_b) and torch.equal(val_a, val_b)
    assert data.class_counts(labels[val_a]) == [10] * 10
    assert len(set(train_a.tolist()) & set(val_a.tolist())) == 0 and len(train_a) + len(val_a) == 1000
    _, val_c = data.stratified_split(labels, 0.1, seed=4)
    assert not torch.equal(val_a, val_c)


def test_normalise_uses_training_statistics():
    images, labels = generated_digits(500, seed=0)
    raw = {
        "train_images": torch.from_numpy(images),
        "train_labels": torch.from_numpy(labels).long(),
        "test_images": torch.from_numpy(images[:50]),
        "test_labels": torch.from_numpy(labels[:50]).long(),
    }
    split = data.normalise_and_split(raw, 0.2, seed=0)
    assert split.train_images.shape == (400, 1, 28, 28)
    assert abs(split.train_images.mean().item()) < 1e-4 and abs(split.train_images.std().item() - 1) < 1e-3
    assert split.test_images.shape == (50, 1, 28, 28)


def test_a_split_is_stored_as_its_digits_and_comes_back_bit_for_bit():
    """processed_mnist_data stores each part's uint8 digits (a quarter of the bytes), not its floats."""
    split = generated_split(600, seed=3, val_fraction=0.2)
    stored = data.tensors_to_bytes(split.as_dict())
    assert {"train_digits", "val_digits", "test_digits"} <= set(split.as_dict()) and "train_images" not in split.as_dict()
    back = data.NormalisedSplit.from_dict(data.tensors_from_bytes(stored))
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(back, f"{part}_images"), getattr(split, f"{part}_images")), part  # bit for bit
        assert torch.equal(getattr(back, f"{part}_labels"), getattr(split, f"{part}_labels")), part
    assert (back.mean, back.std) == (split.mean, split.std)
    floats_only = data.NormalisedSplit(**{k: v for k, v in vars(split).items() if k != "digits"})  # built by hand
    assert "train_images" in floats_only.as_dict()  # stored as floats, as given
    assert torch.equal(floats_only.test_digits(), split.test_digits())  # the digits recovered exactly
    assert len(stored) < 0.3 * len(data.tensors_to_bytes(floats_only.as_dict()))


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_labelled_batch_validation():
    images, labels = generated_digits(20, seed=5)
    got_images, got_labels = data.read_labelled_batch(_npz(images=images, labels=labels))
    assert got_images.shape == (20, 28, 28) and got_labels.dtype == torch.int64
    bad = {
        "no labels": (_npz(images=images), "missing array: labels"),
        "float images": (_npz(images=images.astype(np.float32), labels=labels), "images must be uint8 N x 28 x 28"),
        "wrong shape": (_npz(images=images[:, :27], labels=labels), "images must be uint8 N x 28 x 28"),
        "label 10": (_npz(images=images, labels=np.full(20, 10)), "digits 0-9"),
        "length mismatch": (_npz(images=images, labels=labels[:5]), "labels must be N integers for N=20"),
        "not npz": (b"hello", "not a readable .npz"),
    }
    for payload, complaint in bad.values():
        with pytest.raises(data.LabelledBatchError, match=complaint):
            data.read_labelled_batch(payload)


SMALL = TrainingConfig(channels=(4, 8), hidden=16, epochs=2, batch_size=64, max_lr=0.02, max_shift=1)


def test_training_learns_and_is_deterministic_for_a_seed():
    split = generated_split(1500, seed=7, val_fraction=0.2)
    a, b = train.fit(split, SMALL), train.fit(split, SMALL)
    assert a.history[-1].train_loss < a.history[0].train_loss
    assert a.history[-1].val_accuracy > 0.9
    assert [h.val_accuracy for h in a.history] == [h.val_accuracy for h in b.history]
    for x, y in zip(a.checkpoint["state_dict"].values(), b.checkpoint["state_dict"].values(), strict=True):
        assert torch.equal(x, y)
    other_seed = train.fit(split, replace(SMALL, seed=1))
    assert not torch.equal(other_seed.checkpoint["state_dict"]["head.5.weight"], a.checkpoint["state_dict"]["head.5.weight"])


def test_random_shift_moves_pixels_without_changing_mass():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10:14, 10:14] = 1.0
    shifted = train.random_shift(image, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == image.shape and shifted.sum() == image.sum()
    rows, cols = shifted[0, 0].nonzero(as_tuple=True)
    moved = (rows.min().item() - 10, cols.min().item() - 10)
    assert moved != (0, 0) and max(map(abs, moved)) <= 2  # moved, by at most max_shift
    assert torch.equal(shifted[0, 0, 10 + moved[0] : 14 + moved[0], 10 + moved[1] : 14 + moved[1]], torch.ones(4, 4))


def test_resolve_device():
    assert train.resolve_device("cpu") == "cpu"
    assert train.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        train.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="MNIST_DEVICE=cuda"):
            train.resolve_device("cuda")


def test_evaluation_scores_and_confusion_matrix():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 2, 0])
    confusion = evaluate.confusion_matrix(labels, predictions)
    assert confusion.sum() == 6 and confusion[0, 1] == 1 and confusion[2, 0] == 1 and confusion[1, 1] == 2
    precision, recall, f1 = evaluate.per_class_scores(confusion)
    assert precision[1] == pytest.approx(2 / 3) and recall[0] == pytest.approx(0.5) and f1[2] == pytest.approx(2 / 3)


def test_plots_are_small_pngs():
    curve = plots.training_curve_png([1.0, 0.5, 0.3], [0.9, 0.95, 0.97])
    matrix = plots.confusion_matrix_png(torch.randint(0, 1000, (10, 10)))
    grid = plots.digit_grid_png(torch.rand(24, 1, 28, 28), [str(i) for i in range(24)])
    for png in (curve, matrix, grid):
        assert png.startswith(b"\x89PNG") and len(png) < 100_000


def test_generated_mirror_files_are_valid_idx(tmp_path):
    md5s = write_mnist_mirror(tmp_path, n_train=30, n_test=10)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as handle:
        assert int.from_bytes(handle.read(4), "big") == 2051  # the IDX magic for uint8, 3 dims
    assert set(md5s) == set(data.MNIST_FILES)
