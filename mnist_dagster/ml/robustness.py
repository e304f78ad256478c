"""The perturbed copies of the test set that evaluation's robustness table scores.

`perturbations` are the table's first four conditions (noise, a rotation each way, a shift); then what
uploads and other people's pens do to a digit (issue 22): stroke thickness, blur, low resolution drawn
up, off-centre, rotation within 15 degrees, elastic distortion. Those come from `ml.augment.PERTURBATIONS`
when training's own registry exists (one definition of each perturbation for training and evaluation),
else from `OWN_PERTURBATIONS` here. Every function is batched (no loop per image) and seeded.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from mnist_dagster.ml import augment

#: The perturbations `robustness` has always measured (see `perturbations`).
ROBUSTNESS_NOISE_SIGMA = 0.3  # on [0, 1] pixels: digits stay legible to a person
ROBUSTNESS_DEGREES = 15.0
ROBUSTNESS_SHIFT_PX = 3
#: Test images each perturbation is scored on (`robustness_indices`): 2,000 put a 97% accuracy within
#: +-0.8 point (95% Wilson interval), and keep evaluation's one pass at 10k clean + 11 x 2k perturbed.
ROBUSTNESS_IMAGES = 2000


def robustness_indices(count: int) -> torch.Tensor:
    """Which of `count` test images the perturbations are applied to: every k-th, k = count // 2,000
    (all of them when there are at most 2,000). A fixed, seed-free subset, so every model is judged on
    the same digits; MNIST's test set is not ordered by digit, so every k-th keeps the classes' mix."""
    step = max(1, count // ROBUSTNESS_IMAGES)
    return torch.arange(0, count, step)[:ROBUSTNESS_IMAGES]


def perturbations(pixels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The test pixels under the first perturbations of the robustness table, drawn from `seed`: Gaussian
    noise, a rotation each way about the centre, and a shift left, right, up or down (one per image)."""
    n = len(pixels)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(pixels.shape, generator=generator) * ROBUSTNESS_NOISE_SIGMA
    unit = torch.ones(n)
    no_shift = torch.zeros(n, 2)
    directions = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    shift = directions[torch.randint(0, 4, (n,), generator=generator)] * ROBUSTNESS_SHIFT_PX
    angle = math.radians(ROBUSTNESS_DEGREES)
    return {
        f"gaussian_noise_sigma_{ROBUSTNESS_NOISE_SIGMA:g}": (pixels + noise.to(pixels.device)).clamp(0, 1),
        f"rotation_minus_{ROBUSTNESS_DEGREES:g}deg": augment.affine_warp(pixels, torch.full((n,), -angle), unit, no_shift, 0.0),
        f"rotation_plus_{ROBUSTNESS_DEGREES:g}deg": augment.affine_warp(pixels, torch.full((n,), angle), unit, no_shift, 0.0),
        f"shift_{ROBUSTNESS_SHIFT_PX}px": augment.affine_warp(pixels, torch.zeros(n), unit, shift, 0.0),
    }


# What uploads and other people's pens do to a digit, each at one fixed strength: (pixels in [0, 1],
# N x 1 x 28 x 28, a CPU generator) -> pixels. Used when `ml.augment` has no `PERTURBATIONS` registry.
def stroke_dilate(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A thicker pen: grey-level dilation by a 3x3 square (strokes about 2 px wider)."""
    return F.max_pool2d(pixels, 3, stride=1, padding=1)


def stroke_erode(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A thinner pen: grey-level erosion by a 2x2 square (strokes about 1 px narrower)."""
    return -F.max_pool2d(-F.pad(pixels, (0, 1, 0, 1)), 2, stride=1)


def blur(pixels: torch.Tensor, generator: torch.Generator, sigma: float = 1.0) -> torch.Tensor:
    """An out-of-focus scan: a separable Gaussian blur of `sigma` pixels (background outside the frame)."""
    offsets = torch.arange(-3, 4, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows = F.conv2d(pixels, kernel.view(1, 1, 1, -1), padding=(0, 3))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1), padding=(3, 0)).clamp(0, 1)


def low_resolution(pixels: torch.Tensor, generator: torch.Generator, side: int = 12) -> torch.Tensor:
    """A thumbnail drawn up: averaged down to `side` x `side` pixels, then bilinear back to 28 x 28."""
    small = F.interpolate(pixels, size=(side, side), mode="area")
    return F.interpolate(small, size=pixels.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)


def off_centre(pixels: torch.Tensor, generator: torch.Generator, px: float = 4.0) -> torch.Tensor:
    """A digit written in a corner of its box: shifted `px` pixels along both axes, toward a random corner."""
    n = len(pixels)
    corner = torch.randint(0, 2, (n, 2), generator=generator).float() * 2 - 1
    return augment.affine_warp(pixels, torch.zeros(n), torch.ones(n), corner * px, 0.0)


def random_rotation(pixels: torch.Tensor, generator: torch.Generator, degrees: float = 15.0) -> torch.Tensor:
    """A slanted hand: each digit rotated by an angle uniform within +-`degrees` about its centre."""
    n = len(pixels)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(degrees)
    return augment.affine_warp(pixels, angle, torch.ones(n), torch.zeros(n, 2), 0.0)


def elastic(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A wobbly hand: Simard et al.'s elastic distortion (alpha 34, sigma 4), as `ml.augment` draws it."""
    return augment.random_elastic(pixels, generator, background=0.0)


OWN_PERTURBATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "stroke_dilate_3x3": stroke_dilate,
    "stroke_erode_2x2": stroke_erode,
    "blur_sigma_1": blur,
    "low_resolution_12px": low_resolution,
    "off_centre_4px": off_centre,
    "rotation_within_15deg": random_rotation,
    "elastic_alpha_34_sigma_4": elastic,
}


def perturbation_registry() -> Mapping[str, Callable[..., torch.Tensor]]:
    """`ml.augment.PERTURBATIONS` (the one training augments with) when it exists, else `OWN_PERTURBATIONS`."""
    return getattr(augment, "PERTURBATIONS", None) or OWN_PERTURBATIONS


def all_perturbations(pixels: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Every condition of the robustness table: `perturbations` and then the registry's, each drawn
    from its own generator seeded with `seed` (so adding one never changes another's draw)."""
    conditions = perturbations(pixels, seed)
    for name, function in perturbation_registry().items():
        conditions.setdefault(name, _apply(function, pixels, seed))
    return conditions


def _apply(function: Callable[..., torch.Tensor], pixels: torch.Tensor, seed: int) -> torch.Tensor:
    """Call a registered perturbation with what its signature asks for (a generator or a seed; a
    background of 0 for [0, 1] pixels), so either registry's functions fit."""
    parameters = inspect.signature(function).parameters
    extra: dict[str, object] = {}
    if "generator" in parameters:
        extra["generator"] = torch.Generator().manual_seed(seed)
    if "seed" in parameters:
        extra["seed"] = seed
    if "background" in parameters:
        extra["background"] = 0.0
    return function(pixels, **extra)
