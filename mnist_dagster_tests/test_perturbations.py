"""The perturbations other hands and uploads bring (`ml.augment`): seeded, deterministic, in range, each doing
what its name says, and the `robust` training policy that mixes them."""

import math

import pytest
import torch
import torch.nn.functional as F

from mnist_dagster.ml import augment


def rings(count: int = 12) -> torch.Tensor:
    """Drawn nines: a loop of radius 4-6 px with a tail down its right side, stroke about 2 px, pixels in [0, 1]."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    radius = torch.linspace(4, 6, count).view(-1, 1, 1)
    loop = 1 - (((rows - 10) ** 2 + (cols - 13.5) ** 2).sqrt() - radius).abs().sub(1).clamp(0, 1)
    tail = (1 - (cols - 13.5 - radius).abs().sub(1).clamp(0, 1)) * ((rows >= 10) & (rows <= 23))
    return torch.maximum(loop, tail).unsqueeze(1)


def ink(images: torch.Tensor) -> torch.Tensor:
    return images.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("name", sorted(augment.PERTURBATIONS))
def test_each_perturbation_is_seeded_deterministic_in_range_and_changes_the_digit(name):
    images = rings()
    perturb = augment.PERTURBATIONS[name]
    first, again = (perturb(images.clone(), torch.Generator().manual_seed(0)) for _ in range(2))
    assert first.shape == images.shape and torch.equal(first, again)
    assert first.min() >= -1e-6 and first.max() <= 1 + 1e-6
    changed = (first - images).abs().amax(dim=(1, 2, 3)) > 0.05
    assert changed.float().mean() >= 0.75  # most images changed (a random angle or shift may be near zero)
    assert torch.all(ink(first) > 0.4 * ink(images)) and torch.all(ink(first) < 3 * ink(images))  # the digit stays


@pytest.mark.parametrize("name", ["rotation", "off_centre", "elastic"])
def test_geometric_perturbations_draw_their_direction_from_the_seed(name):
    images = rings()
    perturb = augment.PERTURBATIONS[name]
    assert not torch.equal(
        perturb(images, torch.Generator().manual_seed(0)), perturb(images, torch.Generator().manual_seed(1))
    )


def test_each_perturbation_does_what_its_name_says():
    images, generator = rings(), torch.Generator().manual_seed(0)
    assert torch.all(ink(augment.thicken(images, generator, 1.0)) > 1.3 * ink(images))
    assert torch.all(ink(augment.thin(images, generator, 0.5)) < 0.9 * ink(images))
    blurred = augment.blur(images, generator, 1.0)
    assert torch.allclose(ink(blurred), ink(images), rtol=1e-4)  # blur spreads ink, keeps it
    assert torch.all(blurred.amax(dim=(1, 2, 3)) < images.amax(dim=(1, 2, 3)))
    coarse = augment.low_resolution(images, generator, 2.0)
    assert torch.allclose(ink(coarse), ink(images), rtol=0.05) and not torch.allclose(coarse, images, atol=0.05)
    moved = augment.shift(images, generator, 3.0)
    centre = lambda x: (x.squeeze(1) * torch.arange(28.0)).sum(dim=(1, 2)) / ink(x)  # column centroid
    assert (centre(moved) - centre(images)).abs().max() > 0.5
    # No strength, no change: the magnitudes are what they say.
    for function in (augment.thicken, augment.thin, augment.blur):
        assert torch.allclose(function(images, generator, 0.0), images, atol=1e-6), function.__name__
    assert torch.equal(augment.low_resolution(images, generator, 1.0), images)


def test_a_strength_per_image_is_each_image_at_its_own_strength():
    images = rings(4)
    strengths = torch.tensor([0.0, 0.5, 1.0, 1.5])
    for function in (augment.thicken, augment.thin, augment.blur):
        together = function(images, None, strengths)
        for index, strength in enumerate(strengths.tolist()):
            alone = function(images[index : index + 1], None, strength)
            assert torch.allclose(together[index], alone[0], atol=1e-5), (function.__name__, strength)


def test_the_robust_policy_is_seeded_deterministic_and_works_in_standardised_units():
    mean, std = 0.13, 0.31
    standardised = (rings(64) - mean) / std
    background = -mean / std
    draws = [augment.random_robust(standardised, torch.Generator().manual_seed(s), background) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert draws[0].min() >= background - 1e-5 and draws[0].max() <= standardised.max() + 1e-5
    assert ((draws[0] - standardised).abs().amax(dim=(1, 2, 3)) > 0.05).float().mean() >= 0.75  # most changed


def test_noise_is_the_evaluations_noise_in_either_scale():
    """`noise` on [0, 1] pixels adds Gaussian noise of `strength` and clips to [0, 1] (the evaluation's noise
    row); on standardised images it is that same noise, standardised."""
    mean, std = 0.13, 0.31
    pixels = rings(16)
    noisy = augment.noise(pixels, torch.Generator().manual_seed(0), 0.3)
    drawn = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy, (pixels + 0.3 * drawn).clamp(0, 1))
    standardised = augment.noise((pixels - mean) / std, torch.Generator().manual_seed(0), 0.3, background=-mean / std)
    assert torch.allclose(standardised * std + mean, noisy, atol=1e-5)


def test_the_elastic_fields_are_blurred_as_reflect_padding_and_convolving_would():
    """`_gaussian_blur` as two matrix products is the same linear map as a reflect-padded separable convolution."""
    fields = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for sigma in (1.0, 4.0):
        radius = min(math.ceil(4 * sigma), 27)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        padded = F.pad(fields, (radius,) * 4, mode="reflect")
        rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(2, 1, 1, -1), groups=2)
        convolved = F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(2, 1, -1, 1), groups=2)
        assert torch.allclose(augment._gaussian_blur(fields, sigma), convolved, atol=1e-6), sigma
