"""MNIST as tensors: fetch the canonical files, verify them, read them, normalise and split.

Plain PyTorch, numpy and the standard library; no Dagster here. torchvision is not imported: its
package import costs seconds at the start of `raw_mnist_data` (it loads `torchvision.models`), and all
this module needs from it are the mirrors' addresses and the files' md5s, copied below and checked
against torchvision's own list in the tests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import Request, urlopen

import numpy as np
import torch
#: The public mirrors torchvision downloads from, tried in order (`torchvision.datasets.MNIST.mirrors`).
DEFAULT_MIRRORS: tuple[str, ...] = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
#: The four canonical files and their md5s, as torchvision lists them (`MNIST.resources`).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DOWNLOAD_TIMEOUT_S = 60  # per read: a stalled mirror fails over to the next one

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10


class MnistSourceError(RuntimeError):
    """No source delivered the four MNIST files intact."""


class LabelledBatchError(ValueError):
    """A landed batch of labelled images is not usable training data."""


@dataclass(frozen=True)
class FetchResult:
    source: str
    md5s: dict[str, str]


SPLIT_PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class NormalisedSplit:
    """Float images (N, 1, 28, 28), normalised with the training split's mean and std.

    `digits` keeps the uint8 (N, 28, 28) images each part was made from, when known (`normalise_and_split`
    sets it): `as_dict` then stores those, a quarter of the bytes (55 MB instead of 220 for MNIST, written
    once and read by every step that trains or evaluates), and `from_dict` standardises them again, bit
    for bit the same floats (`standardise`: the same operations in the same order).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: float
    std: float
    digits: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, torch.Tensor | float]:
        """The form assets pass around (tensors and floats: `torch.load(weights_only=True)` reads it): the
        uint8 digits of each part when known, else its float images; labels, mean and std."""
        values: dict[str, torch.Tensor | float] = {"mean": self.mean, "std": self.std}
        for part in SPLIT_PARTS:
            values[f"{part}_labels"] = getattr(self, f"{part}_labels")
            if self.digits is None:
                values[f"{part}_images"] = getattr(self, f"{part}_images")
            else:
                values[f"{part}_digits"] = self.digits[part]
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NormalisedSplit:
        """Back from `as_dict`'s form (either); other keys (provenance) are left out."""
        mean, std = values["mean"], values["std"]
        labels = {f"{part}_labels": values[f"{part}_labels"] for part in SPLIT_PARTS}
        if "train_digits" not in values:
            return cls(**labels, **{f"{part}_images": values[f"{part}_images"] for part in SPLIT_PARTS}, mean=mean, std=std)
        digits = {part: values[f"{part}_digits"] for part in SPLIT_PARTS}
        images = {f"{part}_images": standardise(to_unit_float(digits[part]), mean, std) for part in SPLIT_PARTS}
        return cls(**labels, **images, mean=mean, std=std, digits=digits)

    def test_digits(self) -> torch.Tensor:
        """The test images as uint8 (N, 28, 28), the way they were stored (recovered from the floats when the
        split was built from floats)."""
        if self.digits is not None:
            return self.digits["test"]
        return (self.test_images[:, 0] * self.std + self.mean).clamp(0, 1).mul(255).round().byte()


def parse_sources(value: str | None) -> list[str]:
    """`MNIST_MIRRORS` syntax: comma-separated base URLs or local directories; empty means the public mirrors."""
    sources = [part.strip() for part in (value or "").split(",") if part.strip()]
    return sources or list(DEFAULT_MIRRORS)


def fetch_mnist(sources: Sequence[str], dest: Path, md5s: Mapping[str, str] = MNIST_FILES) -> FetchResult:
    """Put the four verified `.gz` files in `dest`, trying each source in turn.

    `md5s` defaults to torchvision's list of the canonical files. A file already in `dest` with the
    right md5 is kept; a corrupt or partial download never lands there (it is written to a temporary
    folder and moved in only once verified).
    """
    dest.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for source in sources:
        try:
            for filename, md5 in md5s.items():
                _fetch_verified(source, filename, md5, dest)
            return FetchResult(source=source, md5s=dict(md5s))
        except Exception as error:  # noqa: BLE001 - every failure is reported below, per source
            failures.append(f"  - {source}: {error}")
    raise MnistSourceError(
        "Could not fetch MNIST from any source:\n"
        + "\n".join(failures)
        + "\nSet MNIST_MIRRORS to a comma-separated list of base URLs or local directories that hold "
        + ", ".join(MNIST_FILES)
    )


def _fetch_verified(source: str, filename: str, md5: str, dest: Path) -> None:
    target = dest / filename
    if target.is_file() and file_md5(target) == md5:
        return
    with tempfile.TemporaryDirectory(dir=dest, prefix=".partial-") as tmp:
        partial = Path(tmp) / filename
        if _is_url(source):
            _download(f"{source.rstrip('/')}/{filename}", partial)
        else:
            shutil.copyfile(Path(source).expanduser() / filename, partial)
        if file_md5(partial) != md5:
            raise ValueError(f"{filename} failed its md5 check (expected {md5}): corrupt or partial download")
        os.replace(partial, target)


def _download(url: str, path: Path) -> None:
    """`url` streamed to `path` (redirects followed); torchvision's user agent, which some mirrors expect."""
    request = Request(url, headers={"User-Agent": "pytorch/vision"})
    with urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, path.open("wb") as out:  # noqa: S310 - http(s)/ftp/file mirrors by design
        shutil.copyfileobj(response, out, length=1 << 20)


def file_md5(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in {"http", "https", "ftp", "file"}


def read_mnist(folder: Path) -> dict[str, torch.Tensor]:
    """The four verified `.gz` files as uint8 images (N, 28, 28) and int64 labels (N,).

    Read straight from the `.gz` files that `fetch_mnist` verified, never from a decompressed copy
    beside them: the download folder is a cache that outlives runs (and, in prod, is shared by every
    process on the machine), so a decompressed file there may belong to another dataset. Trusting one
    once made prod train on other images than dev from the same mirror.
    """
    return {_tensor_name(filename): torch.from_numpy(_parse_gz(folder / filename)) for filename in MNIST_FILES}


def read_mnist_cached(folder: Path, md5s: Mapping[str, str] = MNIST_FILES) -> dict[str, torch.Tensor]:
    """`read_mnist`, but each file's parsed array is kept as `.npy` under `folder/parsed/`, named by the
    md5 of the `.gz` it came from, and memory-mapped on the next read (milliseconds instead of seconds).

    Never a stale cache: the name ties an array to the verified download (another dataset's `.gz` has
    another md5, so another name), and the array's own sha256, recorded beside it when it was written,
    is checked on every read; a changed, truncated or missing array is parsed again from the verified
    `.gz`. Written to a temporary file and renamed, so a concurrent reader never sees half an array.
    """
    cache = folder / "parsed"
    cache.mkdir(parents=True, exist_ok=True)
    return {_tensor_name(filename): torch.from_numpy(_cached_array(folder / filename, md5, cache)) for filename, md5 in md5s.items()}


def _tensor_name(filename: str) -> str:
    """`train-images-idx3-ubyte.gz` -> `train_images`."""
    split = "train" if filename.startswith("train") else "test"
    return f"{split}_{'images' if 'images' in filename else 'labels'}"


def _parse_gz(path: Path) -> np.ndarray:
    """A verified IDX `.gz` as its array: images stay uint8, labels become int64 (what training indexes with)."""
    array = read_idx_array(gzip.decompress(path.read_bytes()), path.name)
    return array.astype(np.int64) if array.ndim == 1 else array


def _cached_array(gz: Path, md5: str, cache: Path) -> np.ndarray:
    """The parsed array of the verified `gz` (md5 `md5`) from the cache when its digest holds, else parsed anew."""
    array_path, digest_path = cache / f"{md5}.npy", cache / f"{md5}.npy.sha256"
    if array_path.exists() and digest_path.exists() and file_sha256(array_path) == digest_path.read_text().strip():
        try:
            return np.load(array_path, mmap_mode="c", allow_pickle=False)  # copy-on-write: writable, shared pages
        except ValueError:  # an unreadable header with a matching digest: only a hand-made file; parse anew
            pass
    array = _parse_gz(gz)
    _write_atomically(array_path, lambda handle: np.save(handle, array, allow_pickle=False))
    _write_atomically(digest_path, lambda handle: handle.write(file_sha256(array_path).encode()))
    return array


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _write_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}-", delete=False) as handle:
        write(handle)
    os.replace(handle.name, path)


def read_idx(data: bytes, name: str = "IDX data") -> torch.Tensor:
    """A uint8 IDX array (the MNIST file format: a magic number, big-endian dimensions, raw bytes)."""
    return torch.from_numpy(read_idx_array(data, name))


def read_idx_array(data: bytes, name: str = "IDX data") -> np.ndarray:
    """`read_idx` as a numpy array (one copy out of `data`, so it is writable and owns its memory)."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{name} is not a uint8 IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != math.prod(dims):
        raise ValueError(f"{name}: header says {dims}, but holds {len(data) - offset} bytes")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(dims).copy()


def read_labelled_batch(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """A landed `.npz` with `images` (uint8, N x 28 x 28) and `labels` (integers 0-9), validated."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except KeyError as error:
        raise LabelledBatchError(f"missing array: {error.args[0]}; expected 'images' and 'labels'") from error
    except Exception as error:  # noqa: BLE001 - numpy raises many kinds for a bad file
        raise LabelledBatchError(f"not a readable .npz file ({error})") from error
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise LabelledBatchError(f"images must be uint8 N x 28 x 28, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise LabelledBatchError(f"labels must be N integers for N={len(images)} images, got {labels.dtype} {labels.shape}")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise LabelledBatchError("labels must be a non-empty array of digits 0-9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def with_batches(
    raw: Mapping[str, torch.Tensor], images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """`raw` (the MNIST tensors) with labelled batches appended to its training images and labels."""
    return {
        **raw,
        "train_images": torch.cat([raw["train_images"], *images]),
        "train_labels": torch.cat([raw["train_labels"], *labels]),
    }


def tensors_to_bytes(values: Mapping[str, Any]) -> bytes:
    """A dict of tensors and primitives (an asset's value, a checkpoint) as `torch.save` bytes."""
    buffer = io.BytesIO()
    torch.save(dict(values), buffer)
    return buffer.getvalue()


def tensors_from_bytes(data: bytes) -> dict[str, Any]:
    """What `tensors_to_bytes` wrote, on the CPU; `weights_only`: tensors and primitives, nothing unpickled."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def content_hash(*parts: bytes | str) -> str:
    """A short stable hash, used as the data version of what was read."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:16]


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices with each digit in the same proportion in both; seeded."""
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for digit in range(NUM_CLASSES):
        indices = torch.nonzero(labels == digit).flatten()
        indices = indices[torch.randperm(len(indices), generator=generator)]
        n_val = round(len(indices) * val_fraction)
        val_parts.append(indices[:n_val])
        train_parts.append(indices[n_val:])
    train = torch.cat(train_parts)
    val = torch.cat(val_parts)
    return train[torch.randperm(len(train), generator=generator)], val.sort().values


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return images.unsqueeze(1).float().div_(255.0)


def standardise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(images - mean) / std, in place: the one definition, so a split stored as digits comes back bit for bit."""
    return images.sub_(mean).div_(std)


def normalise_and_split(raw: Mapping[str, torch.Tensor], val_fraction: float, seed: int) -> NormalisedSplit:
    """Scale to [0, 1], split the training images, and standardise with the training split's statistics.

    The split indexes the uint8 images (a quarter of the bytes) before they become floats, and each
    float tensor is then scaled and standardised in place: one allocation per split, no copy of the
    whole training set. The values are bit for bit those of scaling first and indexing after (both are
    elementwise), so the same seed gives the same model as before. The uint8 digits of each part stay
    with the split (`NormalisedSplit.digits`), which is how it is stored.
    """
    train_idx, val_idx = stratified_split(raw["train_labels"], val_fraction, seed)
    digits = {"train": raw["train_images"][train_idx], "val": raw["train_images"][val_idx], "test": raw["test_images"]}
    train_images = to_unit_float(digits["train"])
    mean, std = train_images.mean().item(), train_images.std().item()
    return NormalisedSplit(
        train_images=standardise(train_images, mean, std),
        train_labels=raw["train_labels"][train_idx],
        val_images=standardise(to_unit_float(digits["val"]), mean, std),
        val_labels=raw["train_labels"][val_idx],
        test_images=standardise(to_unit_float(digits["test"]), mean, std),
        test_labels=raw["test_labels"].clone(),
        mean=mean,
        std=std,
        digits=digits,
    )


def class_counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=NUM_CLASSES).tolist()


def count_non_finite(images: torch.Tensor) -> int:
    """NaN and infinite values in `images`. One summing pass settles the usual case: a finite sum means
    every value is finite (a NaN or an infinity makes the sum one); only a non-finite sum (or an overflow,
    which standardised pixels never reach) pays for the exact count."""
    if torch.isfinite(images.sum()):
        return 0
    return int(images.numel() - torch.isfinite(images).sum())
