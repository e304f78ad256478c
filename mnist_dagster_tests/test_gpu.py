"""The CUDA path: device placement, pinned-memory transfer, bf16 mixed precision, and a prod run on the GPU.

GPU tests skip cleanly (with the reason) on machines without CUDA; the CPU-path tests run everywhere and
pin down that mixed precision never touches the CPU path.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import dagster as dg
import numpy as np
import pytest
import torch

from mnist_dagster.ml import train
from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.ml.data import NormalisedSplit
from mnist_dagster.ml.model import load_checkpoint
from mnist_dagster.resources import prod_resources
from mnist_dagster.resources.compute import ComputeResource
from mnist_dagster.resources.mnist_source import MnistSource
from mnist_dagster_tests.support import FAST_RUN_CONFIG, generated_digits, pipeline_assets_and_checks

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
needs_no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks behaviour on a machine without CUDA")
SMALL = TrainingConfig(channels=(8, 16), hidden=32, batch_size=64, max_lr=0.02)


def small_dataset(count: int = 1200, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = generated_digits(count, seed)
    pixels = torch.from_numpy(images).float().div(255).unsqueeze(1)
    return (pixels - pixels.mean()) / pixels.std(), torch.from_numpy(labels).long()


def small_split() -> NormalisedSplit:
    (x, y), (val_x, val_y) = small_dataset(), small_dataset(300, seed=2)
    return NormalisedSplit(x, y, val_x, val_y, val_x, val_y, mean=0.0, std=1.0)


@contextmanager
def convolution_dtypes() -> Iterator[list[torch.dtype]]:
    """Records the dtype every convolution computes in, on every forward pass, while the block runs."""
    seen: list[torch.dtype] = []

    def record(module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def train_small(device: str, mixed_precision: bool = True, epochs: int = 2):
    split = small_split()
    with convolution_dtypes() as dtypes:
        trained = train.fit(split, replace(SMALL, epochs=epochs), device, mixed_precision)
    return trained, dtypes, (split.val_images, split.val_labels)


# --- the CPU path, everywhere ------------------------------------------------------------------


def test_cpu_path_trains_in_bf16_only_where_the_cpu_has_it_and_keeps_float32_weights():
    """Mixed precision on the CPU is bf16 autocast where oneDNN has bf16 kernels (AVX512-BF16, AMX), float32
    elsewhere (emulated bf16 would be slower); the weights, and the graph that serves, stay float32."""
    trained, dtypes, _ = train_small("cpu", mixed_precision=True, epochs=1)
    # training steps in bf16 where native; each epoch's validation in float32, as the ONNX graph serves
    expected = {torch.bfloat16, torch.float32} if train.native_bf16(torch.device("cpu")) else {torch.float32}
    assert dtypes and set(dtypes) == expected
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in trained.model.parameters())
    assert trained.history[-1].val_accuracy > 0.5  # it learned something: the path is real, not skipped


def test_cpu_path_trains_in_float32_with_mixed_precision_off():
    trained, dtypes, _ = train_small("cpu", mixed_precision=False, epochs=1)
    assert dtypes and set(dtypes) == {torch.float32}
    assert trained.history[-1].val_accuracy > 0.5


@needs_no_cuda
def test_auto_means_cpu_without_a_gpu():
    assert ComputeResource(device="auto").resolve_device() == "cpu"


@needs_no_cuda
def test_cuda_requested_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="MNIST_DEVICE=cuda but no CUDA device is available"):
        ComputeResource(device="cuda").resolve_device()


def test_unknown_device_in_resource_config_is_named():
    with pytest.raises(ValueError, match="MNIST_DEVICE='tpu' is not one of auto, cpu, cuda"):
        ComputeResource(device="tpu").resolve_device()


# --- the CUDA path, where there is a GPU -------------------------------------------------------


@needs_cuda
def test_auto_means_cuda_with_a_gpu():
    assert ComputeResource(device="auto").resolve_device() == "cuda"


@needs_cuda
def test_cuda_training_uses_pinned_memory_and_bf16_autocast(monkeypatch):
    pinned: list[tuple[int, ...]] = []
    original = torch.Tensor.pin_memory

    def spy(tensor, *args, **kwargs):
        pinned.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    trained, dtypes, (val_x, val_y) = train_small("cuda", mixed_precision=True)
    model, checkpoint = trained.model, trained.checkpoint
    assert (1200, 1, 28, 28) in pinned  # the training set went to the GPU once, through pinned memory
    assert torch.bfloat16 in dtypes  # convolutions ran under bf16 autocast
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert trained.history[-1].val_accuracy > 0.9

    # The checkpoint is device-free: it loads on the CPU and predicts what the GPU model predicts.
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())
    cpu_model, _ = load_checkpoint(checkpoint, "cpu")
    gpu_predictions = train.predict_logits(model, val_x, device="cuda").argmax(1)
    cpu_predictions = train.predict_logits(cpu_model, val_x, device="cpu").argmax(1)
    assert (gpu_predictions == cpu_predictions).float().mean().item() >= 0.99


@needs_cuda
def test_cuda_without_mixed_precision_trains_in_float32():
    trained, dtypes, _ = train_small("cuda", mixed_precision=False, epochs=1)
    assert set(dtypes) == {torch.float32}
    assert trained.history[-1].val_accuracy > 0.5


@needs_cuda
def test_prod_pipeline_trains_on_the_gpu_and_serves_on_the_cpu(prod_env, fake_mirror, instance, monkeypatch):
    """The prod resources with MNIST_DEVICE=cuda, end to end on S3: trained on the GPU, served by ONNX Runtime."""
    from mnist_dagster.lifecycle import deploy
    from mnist_dagster.scoring import bundle
    from mnist_dagster.storage import open_store

    mirror, md5s = fake_mirror
    monkeypatch.setenv("MNIST_DEVICE", "cuda")
    resources = {
        **prod_resources({**prod_env, "MNIST_DEVICE": "cuda"}),
        "mnist_source": MnistSource(mirrors=str(mirror), md5s=md5s),
    }
    assets, _ = pipeline_assets_and_checks()
    training = {
        "raw_mnist_data", "processed_mnist_data", "digit_classifier", "model_evaluation", "production_digit_classifier"
    }
    selection = [asset for asset in assets if asset.key.to_user_string() in training]  # checks ride on their assets
    result = dg.materialize(selection, resources=resources, instance=instance, run_config=FAST_RUN_CONFIG)
    assert result.success
    assert result.asset_materializations_for_node("digit_classifier")[0].metadata["device"].value == "cuda"
    accuracy = result.asset_materializations_for_node("model_evaluation")[0].metadata["test_accuracy"].value
    assert accuracy > 0.95

    store = open_store(f"s3://{prod_env['S3_BUCKET']}/{prod_env['S3_PREFIX']}")
    predictor = bundle.Predictor(deploy.production_bundle(store))
    images, labels = generated_digits(300, seed=2)  # the generated test split
    probabilities = predictor.predict_proba(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0)
    # ONNX on the CPU agrees with the (bf16) GPU evaluation to within 3 of the 300 test images.
    assert abs((probabilities.argmax(1) == labels).mean() - accuracy) <= 0.01
