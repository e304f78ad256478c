"""Batched, seeded geometric augmentation of whole batches of digit images (N, 1, 28, 28).

`AUGMENTATIONS` names the policies; `none` and `shift` (`ml.train.random_shift`) live with training,
`affine`, `elastic` and `robust` (the perturbations below, mixed) here. Both warp `images - background` with `F.grid_sample` (bilinear, zero
padding) and add `background` back, so pixels pulled in from outside the frame are background and the
output never leaves [min(inputs, background), max(inputs, background)] (for [0, 1] pixels with
background 0: never leaves [0, 1]). `background` is what a blank pixel is worth in the images' scale:
0 for [0, 1] pixels, `-mean / std` once standardised.

All randomness is drawn on the CPU from `generator` (a CPU `torch.Generator`) and then moved to the
images' device, so the same seed draws the same warps on CPU and GPU. No Python loop per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

#: The augmentation policies `TrainingConfig` may name.
AUGMENTATIONS = ("none", "shift", "affine", "elastic", "robust")


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
    """Separable Gaussian blur of each channel, reflecting at the edges (as `scipy.ndimage.gaussian_filter`).

    Each pass is one matrix product with a (size x size) blur matrix that has the reflection folded in:
    on 28x28 fields that is ~20x faster on CPU than two depthwise convolutions over padded copies (10k
    elastic fields: 0.27 s against 5.4 s), with the same result to float rounding."""
    _, _, height, width = fields.shape
    radius = max(1, min(math.ceil(4 * sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, device=fields.device, dtype=fields.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    return _blur_matrix(height, kernel, radius) @ fields @ _blur_matrix(width, kernel, radius).T


def _blur_matrix(size: int, kernel: Tensor, radius: int) -> Tensor:
    """M with (M @ x)[i] = the reflect-padded 1-D convolution of x with `kernel` at i: the kernel's
    response to each unit impulse, one column per impulse."""
    impulses = F.pad(
        torch.eye(size, device=kernel.device, dtype=kernel.dtype).unsqueeze(1), (radius, radius), mode="reflect"
    )
    return F.conv1d(impulses, kernel.view(1, 1, -1))[:, 0, :].T


def _sample(images: Tensor, grid: Tensor, background: float) -> Tensor:
    """`images` resampled at `grid`, outside the frame = `background`, clamped to the inputs' range."""
    warped = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped = warped + background
    # Bilinear weights are a convex combination, so this only trims float rounding at the top.
    low = images.amin().clamp(max=background)
    high = images.amax().clamp(min=background)
    return torch.clamp(warped, low, high)


# --- perturbations: how other people's pens, scanners and uploads change a digit ----------------------
#
# Each is a plain function `(images, generator, strength, background=0.0) -> images` on a batch
# (N, 1, 28, 28), ink brighter than `background` (pixels in [0, 1] with background 0, or standardised
# images with background -mean/std: every one commutes with that affine map). Geometric ones draw a
# direction per image from `generator` (rotation angle, shift vector, elastic field) up to `strength`;
# the others apply `strength` as given (a float, or one value per image as a tensor (N,)), so that
# training can draw it per image and evaluation can fix it. `PERTURBATIONS` fixes evaluation strengths.


def rotate(images: Tensor, generator: torch.Generator, strength: float = 15.0, background: float = 0.0) -> Tensor:
    """Rotate each image about its centre by an angle uniform in [-strength, strength] degrees."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(strength)
    return affine_warp(images, angle, torch.ones(n), torch.zeros(n, 2), background)


def shift(images: Tensor, generator: torch.Generator, strength: float = 3.0, background: float = 0.0) -> Tensor:
    """Move each digit off centre by up to `strength` pixels along each axis (uniform, continuous)."""
    n = images.shape[0]
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * strength
    return affine_warp(images, torch.zeros(n), torch.ones(n), offset, background)


def elastic(images: Tensor, generator: torch.Generator, strength: float = 34.0, background: float = 0.0) -> Tensor:
    """Elastic distortion with displacement scale `strength` pixels (`random_elastic`, sigma 4)."""
    return random_elastic(images, generator, background, alpha=strength)


def thicken(
    images: Tensor, generator: torch.Generator, strength: float | Tensor = 1.0, background: float = 0.0
) -> Tensor:
    """A heavier pen: grey dilation by a 3x3 cross, `strength` times (fractions blend with the next step)."""
    return _morphology(images, _per_image(strength, images), torch.maximum)


def thin(images: Tensor, generator: torch.Generator, strength: float | Tensor = 0.5, background: float = 0.0) -> Tensor:
    """A finer pen: grey erosion by a 3x3 cross, `strength` times (0.5: half-way to one full erosion)."""
    return _morphology(images, _per_image(strength, images), torch.minimum)


def blur(images: Tensor, generator: torch.Generator, strength: float | Tensor = 1.0, background: float = 0.0) -> Tensor:
    """An out-of-focus scan: Gaussian blur of `strength` pixels' sigma (0: unchanged), zero-padded at the edges."""
    n, _, height, width = images.shape
    sigma = _per_image(strength, images).clamp(min=1e-3)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernels = kernels * (offsets.abs().view(1, -1) <= (3 * sigma).ceil().view(-1, 1))  # each its own 3-sigma support
    kernels = (kernels / kernels.sum(1, keepdim=True)).view(n, 1, 1, -1)
    flat = (images - background).view(1, n, height, width)
    flat = F.conv2d(flat, kernels, padding=(0, radius), groups=n)
    flat = F.conv2d(flat, kernels.transpose(2, 3), padding=(radius, 0), groups=n)
    return flat.view(n, 1, height, width) + background


def low_resolution(
    images: Tensor, generator: torch.Generator, strength: float | Tensor = 2.0, background: float = 0.0
) -> Tensor:
    """A small or coarse capture drawn up: shrink by `strength` (area average), then enlarge back (bilinear)."""
    _, _, height, width = images.shape
    factor = _per_image(strength, images).clamp(min=1.0)
    sides = (height / factor).round().long().clamp(min=4).tolist()
    out = images.clone()
    for side in sorted(set(sides)):
        if side >= height:
            continue
        chosen = torch.tensor([s == side for s in sides], device=images.device)
        small = F.interpolate(images[chosen], size=(side, side * width // height), mode="area")
        out[chosen] = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return out


def noise(
    images: Tensor, generator: torch.Generator, strength: float | Tensor = 0.3, background: float = 0.0
) -> Tensor:
    """A grainy scan: Gaussian noise of `strength` (sigma, in units of the blank-to-white range) on every
    pixel, clipped to that range, as the evaluation's noise row does on [0, 1] pixels. The white level is
    the batch's brightest pixel (1 in any batch of MNIST digits), so standardised images get the same noise."""
    span = (images.amax() - background).clamp(min=1e-6)
    sigma = _per_image(strength, images).view(-1, 1, 1, 1) * span
    drawn = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    return (images + drawn * sigma).clamp(background, background + span)


def _per_image(strength: float | Tensor, images: Tensor) -> Tensor:
    """`strength` as one value per image (N,), on the images' device and dtype."""
    return torch.as_tensor(strength, dtype=images.dtype).to(images.device).expand(images.shape[0]).clone()


def _morphology(images: Tensor, amount: Tensor, combine) -> Tensor:
    """`combine` (max: dilate, min: erode) over each pixel's 3x3 cross, floor(amount) times, then blend the rest."""
    out = images
    for step in range(math.ceil(float(amount.max()))):
        nxt = _cross_step(out, combine)
        weight = (amount - step).clamp(0, 1).view(-1, 1, 1, 1)
        out = out + weight * (nxt - out)
    return out


def _cross_step(images: Tensor, combine) -> Tensor:
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    result = images
    for rows, cols in ((slice(0, -2), slice(1, -1)), (slice(2, None), slice(1, -1)),
                       (slice(1, -1), slice(0, -2)), (slice(1, -1), slice(2, None))):  # fmt: skip
        result = combine(result, padded[..., rows, cols])
    return result


Perturbation = Callable[[Tensor, torch.Generator], Tensor]

#: What the evaluation's robustness table measures, each at a fixed strength, on pixels in [0, 1]
#: (background 0): `PERTURBATIONS[name](pixels, torch.Generator().manual_seed(seed))`.
EVALUATION_STRENGTHS: dict[str, float] = {
    "thick": 1.0,  # one full dilation: strokes about 2 px wider
    "thin": 0.5,  # half an erosion: a finer pen without breaking strokes
    "blur": 1.0,  # Gaussian sigma 1 px
    "low_resolution": 2.0,  # captured at 14x14, drawn up to 28x28
    "off_centre": 3.0,  # up to 3 px off along each axis
    "rotation": 15.0,  # within 15 degrees either way
    "elastic": 34.0,  # Simard et al.'s alpha, sigma 4
}
_FUNCTIONS = {"thick": thicken, "thin": thin, "blur": blur, "low_resolution": low_resolution,
              "off_centre": shift, "rotation": rotate, "elastic": elastic}  # fmt: skip
PERTURBATIONS: dict[str, Perturbation] = {
    name: partial(_FUNCTIONS[name], strength=strength) for name, strength in EVALUATION_STRENGTHS.items()
}


#: The `robust` policy's mix: (perturbation, lowest and highest strength drawn per image, weight). A perturbed
#: image gets a random affine warp, then one of these (in proportion to the weights) or nothing (weight 1).
ROBUST_MIX: tuple[tuple[Callable[..., Tensor], float, float, float], ...] = (
    (thicken, 0.3, 1.5, 1.0),
    (thin, 0.2, 0.7, 1.0),
    (blur, 0.5, 1.3, 1.0),
    (low_resolution, 1.3, 2.5, 1.0),
    (elastic, 34.0, 34.0, 2.0),
    (noise, 0.1, 0.4, 1.0),
)
#: The share of images the `robust` policy leaves as MNIST writes them (only moved up to 2 px, as `shift`
#: does): the clean digits keep clean accuracy where the perturbed ones alone cost it.
ROBUST_CLEAN_SHARE = 0.5


def random_robust(images: Tensor, generator: torch.Generator, background: float) -> Tensor:
    """Training for other hands: `ROBUST_CLEAN_SHARE` of the images only moved by up to 2 px; the others get a
    random affine warp (rotation within 15 degrees, scale 0.85-1.1, up to 3 px off centre), then one of
    `ROBUST_MIX` at a random strength, or nothing."""
    n = images.shape[0]
    if n == 0:
        return images.clone()
    clean = torch.rand(n, generator=generator) < ROBUST_CLEAN_SHARE
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15.0)
    factor = torch.empty(n).uniform_(0.85, 1.1, generator=generator)
    offset = (torch.rand(n, 2, generator=generator) * 2 - 1) * torch.where(clean, 2.0, 3.0).view(n, 1)
    angle, factor = torch.where(clean, 0.0, angle), torch.where(clean, 1.0, factor)
    out = affine_warp(images, angle, factor, offset, background)
    weights = torch.tensor([weight for *_, weight in ROBUST_MIX] + [1.0])
    choice = torch.multinomial(weights, n, replacement=True, generator=generator)
    choice[clean] = len(ROBUST_MIX)  # nothing more for the clean ones
    amounts = torch.rand(len(ROBUST_MIX), n, generator=generator)
    for index, (function, low, high, _) in enumerate(ROBUST_MIX):
        chosen = choice == index
        if chosen.any():
            strength = (low + (high - low) * amounts[index][chosen]).to(images.device, images.dtype)
            if low == high:
                strength = low
            out[chosen.to(images.device)] = function(out[chosen.to(images.device)], generator, strength, background)
    return out
