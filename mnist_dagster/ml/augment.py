"""Batched, seeded geometric augmentation of whole batches of digit images (N, 1, 28, 28).

`AUGMENTATIONS` names the policies; `none` and `shift` (`ml.train.random_shift`) live with training,
`affine` and `elastic` here. Both warp `images - background` with `F.grid_sample` (bilinear, zero
padding) and add `background` back, so pixels pulled in from outside the frame are background and the
output never leaves [min(inputs, background), max(inputs, background)] (for [0, 1] pixels with
background 0: never leaves [0, 1]). `background` is what a blank pixel is worth in the images' scale:
0 for [0, 1] pixels, `-mean / std` once standardised.

All randomness is drawn on the CPU from `generator` (a CPU `torch.Generator`) and then moved to the
images' device, so the same seed draws the same warps on CPU and GPU. No Python loop per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: The augmentation policies `TrainingConfig` may name.
AUGMENTATIONS = ("none", "shift", "affine", "elastic")


def random_affine(
    images: Tensor,
    generator: torch.Generator,
    background: float,
    max_degrees: float = 10.0,
    scale: tuple[float, float] = (0.9, 1.1),
    max_translate_px: float = 2.0,
) -> Tensor:
    """Rotate each image by up to `max_degrees` about its centre, scale it by a factor in `scale`, and
    translate it by up to `max_translate_px` pixels along each axis (all uniform, continuous)."""
    n = images.shape[0]
    if n == 0:
        return images.clone()
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    factor = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_translate_px
    return affine_warp(images, angle, factor, shift, background)


def affine_warp(images: Tensor, angle: Tensor, factor: Tensor, shift_px: Tensor, background: float) -> Tensor:
    """Rotate image i by `angle[i]` radians about its centre, scale it by `factor[i]` and translate it by
    `shift_px[i]` = (x, y) pixels: the deterministic warp behind `random_affine` and the robustness metric."""
    _, _, height, width = images.shape
    # affine_grid maps output coordinates to input coordinates (the inverse of the warp), in units where
    # the image spans [-1, 1]: one pixel is 2 / side. Warp: p -> s R p + t; inverse: R^T (p - t) / s.
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    inverse = torch.stack([torch.stack([cos, sin], dim=1), torch.stack([-sin, cos], dim=1)], dim=1)  # (n, 2, 2)
    t = shift_px * torch.tensor([2.0 / width, 2.0 / height])
    theta = torch.cat([inverse, -(inverse @ t.unsqueeze(2))], dim=2)  # (n, 2, 3)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return _sample(images, grid, background)


def random_elastic(
    images: Tensor,
    generator: torch.Generator,
    background: float,
    alpha: float = 34.0,
    sigma: float = 4.0,
) -> Tensor:
    """Elastic distortion (Simard, Steinkraus & Platt 2003): per-pixel displacements uniform in [-1, 1],
    smoothed by a Gaussian of `sigma` pixels and scaled by `alpha` pixels (34 and 4 as in the paper:
    strokes bend and thicken locally, digits stay legible)."""
    n, _, height, width = images.shape
    if n == 0:
        return images.clone()
    noise = (torch.rand(n, 2, height, width, generator=generator) * 2 - 1).to(images.device, images.dtype)
    displacement = _gaussian_blur(noise, sigma) * alpha  # (n, 2, H, W) in pixels: x then y
    displacement = displacement * torch.tensor([2.0 / width, 2.0 / height], device=images.device).view(1, 2, 1, 1)
    identity = torch.eye(2, 3, device=images.device, dtype=images.dtype).expand(n, 2, 3)
    grid = F.affine_grid(identity, list(images.shape), align_corners=False) + displacement.permute(0, 2, 3, 1)
    return _sample(images, grid, background)


def _gaussian_blur(fields: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of each channel, reflecting at the edges (as `scipy.ndimage.gaussian_filter`)."""
    _, channels, height, width = fields.shape
    radius = max(1, min(math.ceil(4 * sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, device=fields.device, dtype=fields.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    fields = F.pad(fields, (radius, radius, radius, radius), mode="reflect")
    fields = F.conv2d(fields, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(fields, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def _sample(images: Tensor, grid: Tensor, background: float) -> Tensor:
    """`images` resampled at `grid`, outside the frame = `background`, clamped to the inputs' range."""
    warped = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped + background
    # Bilinear weights are a convex combination, so this only trims float rounding at the top.
    low = images.amin().clamp(max=background)
    high = images.amax().clamp(min=background)
    return torch.clamp(warped, low, high)
