"""The parsed-array cache of `raw_mnist_data` (`ml.data.read_mnist_cached`): read back what was verified,
never a stale, changed or truncated array, whatever is left in the cache folder."""

import hashlib
import os

import numpy as np
import pytest
import torch

from mnist_dagster.ml import data
from mnist_dagster_tests.support import serve_folder, write_mnist_mirror

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"


@pytest.fixture
def verified(tmp_path):
    """Generated MNIST files fetched over a real HTTP mirror into a cache folder: (url, cache, md5s)."""
    md5s = write_mnist_mirror(tmp_path / "served", n_train=300, n_test=60)
    with serve_folder(tmp_path / "served") as url:
        cache = tmp_path / "cache"
        data.fetch_mnist([url], cache, md5s)
        yield url, cache, md5s


def cached_array(cache, md5s, filename=TRAIN_IMAGES):
    return cache / "parsed" / f"{md5s[filename]}.npy"


def assert_same(tensors, expected):
    assert set(tensors) == set(expected)
    for name, tensor in tensors.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name


def refuse_to_parse(monkeypatch):
    def parse(path):
        raise AssertionError(f"{path.name} was parsed again, though its cached array is intact")

    monkeypatch.setattr(data, "_parse_gz", parse)


def test_second_read_comes_from_the_cache_and_equals_the_download(verified, monkeypatch):
    _, cache, md5s = verified
    truth = data.read_mnist(cache)  # straight from the verified .gz files
    assert_same(data.read_mnist_cached(cache, md5s), truth)
    assert all(cached_array(cache, md5s, name).is_file() for name in md5s)
    refuse_to_parse(monkeypatch)  # from here on, only the cache can answer
    again = data.read_mnist_cached(cache, md5s)
    assert_same(again, truth)
    assert again["train_labels"].dtype == torch.int64 and again["train_images"].shape == (300, 28, 28)


def test_a_corrupted_cached_array_is_detected_and_read_again(verified):
    _, cache, md5s = verified
    truth = data.read_mnist(cache)
    data.read_mnist_cached(cache, md5s)
    path = cached_array(cache, md5s)
    stat = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-500:] = bytes(255 - b for b in raw[-500:])  # same size, other pixels
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old timestamp: only the content tells
    assert_same(data.read_mnist_cached(cache, md5s), truth)
    assert data.file_sha256(path) == (path.parent / f"{path.name}.sha256").read_text()  # the cache was repaired


def test_a_truncated_cached_array_is_detected_and_read_again(verified, monkeypatch):
    _, cache, md5s = verified
    truth = data.read_mnist(cache)
    data.read_mnist_cached(cache, md5s)
    path = cached_array(cache, md5s, "t10k-labels-idx1-ubyte.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_same(data.read_mnist_cached(cache, md5s), truth)
    refuse_to_parse(monkeypatch)
    assert_same(data.read_mnist_cached(cache, md5s), truth)  # repaired once, then read from the cache again


def test_a_truncated_download_is_fetched_again_and_the_cache_still_matches_it(verified):
    url, cache, md5s = verified
    truth = data.read_mnist(cache)
    data.read_mnist_cached(cache, md5s)
    gz = cache / TRAIN_IMAGES
    gz.write_bytes(gz.read_bytes()[:100])
    data.fetch_mnist([url], cache, md5s)  # the md5 check finds the damage and downloads the file again
    assert hashlib.md5(gz.read_bytes()).hexdigest() == md5s[TRAIN_IMAGES]
    assert_same(data.read_mnist_cached(cache, md5s), truth)


def test_another_dataset_in_the_same_cache_folder_never_reads_the_first_ones_arrays(verified, tmp_path):
    """The stale-cache incident: one folder, two MNIST-format datasets. Arrays are named by the md5 of
    the download they came from, so the second dataset gets its own, never the first one's."""
    _, cache, md5s = verified
    data.read_mnist_cached(cache, md5s)
    other_md5s = write_mnist_mirror(tmp_path / "other", n_train=40, n_test=20)
    assert other_md5s != md5s
    data.fetch_mnist([str(tmp_path / "other")], cache, other_md5s)  # replaces the .gz files in the same folder
    other = data.read_mnist_cached(cache, other_md5s)
    assert_same(other, data.read_mnist(cache))
    assert other["train_images"].shape == (40, 28, 28)
    assert np.load(cached_array(cache, md5s)).shape == (300, 28, 28)  # the first dataset's arrays untouched


def test_the_no_nan_check_counts_every_non_finite_value_and_passes_clean_images():
    images = torch.randn(50, 1, 28, 28)
    assert data.count_non_finite(images) == 0
    images[3, 0, 5, 5], images[7, 0, 1, 2], images[9, 0, 0, 0] = float("nan"), float("inf"), float("-inf")
    assert data.count_non_finite(images) == 3
