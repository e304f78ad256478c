"""Every architecture maps (N, 1, 28, 28) to (N, 10) logits and exports to ONNX that onnxruntime runs
the same; the batched augmentations keep shape and range, are seeded, and really move pixels.

Self-contained: images are drawn here with torch, no fixtures from other test modules.
"""

from __future__ import annotations

import inspect
import io

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mnist_dagster.ml.architectures import ARCHITECTURES, build
from mnist_dagster.ml.architectures.vit import DigitViT
from mnist_dagster.ml.augment import AUGMENTATIONS, random_affine, random_elastic

SMALL_PARAMS = {
    "cnn": {"channels": (4, 8), "hidden": 16, "dropout": 0.1},
    "resnet": {"channels": (4, 8, 8), "depth": 2, "dropout": 0.1},
    "vit": {"hidden": 16, "depth": 2, "heads": 2, "patch_size": 7, "dropout": 0.1},
}
WARPS = {"affine": random_affine, "elastic": random_elastic}  # robust: tested in test_perturbations.py


def strokes(n: int, seed: int = 0) -> torch.Tensor:
    """`n` digit-like images in [0, 1]: a few thick random strokes on a blank background."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    for _ in range(3):
        start, end = torch.rand(2, n, 2, generator=generator) * 16 + 6
        for t in torch.linspace(0, 1, 12):
            centre = start + (end - start) * t  # (n, 2)
            distance = (rows - centre[:, 0, None, None]) ** 2 + (cols - centre[:, 1, None, None]) ** 2
            images[:, 0] = torch.maximum(images[:, 0], (1.5 - distance.sqrt()).clamp(0, 1))
    return images


def test_every_architecture_is_covered_and_takes_exactly_its_params() -> None:
    assert set(SMALL_PARAMS) == set(ARCHITECTURES)
    for name, cls in ARCHITECTURES.items():
        assert tuple(inspect.signature(cls.__init__).parameters)[1:] == cls.PARAMS
        assert set(SMALL_PARAMS[name]) == set(cls.PARAMS)


@pytest.mark.parametrize("name", sorted(SMALL_PARAMS))
def test_logits_shape_and_onnx_parity(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, SMALL_PARAMS[name])
    model.train()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    model.eval()
    images = (strokes(5) - 0.13) / 0.31
    with torch.no_grad():
        expected = model(images)
    assert expected.shape == (5, 10) and expected.dtype == torch.float32 and torch.isfinite(expected).all()

    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 28, 28),),
        buffer,
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"pixels": images.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("patch_size", [3, 5, 0])
def test_vit_rejects_a_patch_size_that_does_not_divide_28(patch_size: int) -> None:
    with pytest.raises(ValueError, match="patch_size"):
        DigitViT(hidden=16, depth=1, heads=2, patch_size=patch_size, dropout=0.0)


def test_policies() -> None:
    assert AUGMENTATIONS == ("none", "shift", "affine", "elastic", "robust")


@pytest.mark.parametrize("policy", sorted(WARPS))
def test_warp_keeps_shape_and_range_in_pixel_space(policy: str) -> None:
    images = strokes(16)
    out = WARPS[policy](images, torch.Generator().manual_seed(0), 0.0)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0.0 and out.max() <= images.max()


@pytest.mark.parametrize("policy", sorted(WARPS))
def test_warp_keeps_range_when_standardised(policy: str) -> None:
    mean, std = 0.1307, 0.3081
    images = (strokes(16) - mean) / std
    background = -mean / std
    out = WARPS[policy](images, torch.Generator().manual_seed(0), background)
    assert out.min() >= min(images.min().item(), background) and out.max() <= images.max()
    corners = out[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]  # far from any stroke: still background
    torch.testing.assert_close(corners, torch.full_like(corners, background))


@pytest.mark.parametrize("policy", sorted(WARPS))
def test_warp_is_seeded_and_moves_pixels(policy: str) -> None:
    images = strokes(16)
    warp = WARPS[policy]
    first = warp(images, torch.Generator().manual_seed(7), 0.0)
    again = warp(images, torch.Generator().manual_seed(7), 0.0)
    other = warp(images, torch.Generator().manual_seed(8), 0.0)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)
    moved = (first - images).abs().flatten(1).amax(dim=1)
    assert (moved > 0.1).all(), "every image should be visibly warped"
    # A warp, not a fade: over the batch the ink is roughly kept (one image may stretch or shrink).
    assert 0.85 < first.sum().item() / images.sum().item() < 1.15


@pytest.mark.parametrize("policy", sorted(WARPS))
@pytest.mark.parametrize("background", [0.0, -0.4242])
def test_blank_stays_blank(policy: str, background: float) -> None:
    blank = torch.full((4, 1, 28, 28), background)
    out = WARPS[policy](blank, torch.Generator().manual_seed(0), background)
    assert torch.equal(out, blank)


@pytest.mark.parametrize("policy", sorted(WARPS))
def test_warp_of_an_empty_batch(policy: str) -> None:
    assert WARPS[policy](torch.zeros(0, 1, 28, 28), torch.Generator().manual_seed(0), 0.0).shape == (0, 1, 28, 28)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("policy", sorted(WARPS))
def test_warp_draws_the_same_on_gpu(policy: str) -> None:
    images = strokes(8)
    cpu = WARPS[policy](images, torch.Generator().manual_seed(3), 0.0)
    gpu = WARPS[policy](images.cuda(), torch.Generator().manual_seed(3), 0.0)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
