"""Training: `fit` is the one entry point. In-memory tensors, shuffled mini-batches, AdamW with a
one-cycle learning rate, over the one block of defaults in `mnist_dagster.ml.config`.

MNIST fits in memory many times over, so batches are sliced from tensors directly (no DataLoader
workers to start); on CUDA the data is moved once. Mixed precision (bf16 autocast) is used wherever the
device computes bf16 natively: CUDA GPUs that have it, and CPUs with AVX512-BF16 or AMX (`native_bf16`).

Data-parallel (DDP): when a `torch.distributed` process group is up (torchrun started this process,
see `ml.distributed`), the same `fit` trains a `DistributedDataParallel` model. Every rank draws the
same batch order and augmentation from the seed and trains on its strided share of each global batch
of `batch_size` images, so the data stream, the schedule and the effective batch are the single-process
run's (only BatchNorm's batch statistics are per rank).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mnist_dagster.ml.config import TrainingConfig
from mnist_dagster.ml.data import NormalisedSplit
from mnist_dagster.ml import architectures, augment
from mnist_dagster.ml.architectures.ensemble import ENSEMBLE, assemble, ensemble_params
from mnist_dagster.ml.calibrate import TemperatureScaled, fit_temperature
from mnist_dagster.ml.model import make_checkpoint, parameter_count


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_accuracy: float
    learning_rate: float
    seconds: float


def resolve_device(requested: str) -> str:
    """`auto` -> CUDA when available, else CPU; `cuda` without a GPU is an error, not a silent fallback."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("MNIST_DEVICE=cuda but no CUDA device is available")
    if requested not in {"cpu", "cuda"}:
        raise ValueError(f"device must be auto, cpu or cuda, got {requested!r}")
    return requested


@dataclass(frozen=True)
class Shard:
    """This process's place among data-parallel processes: rank `rank` of `world_size` (1 = no DDP)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Shard:
        """From the process group torchrun's worker joined, if any: `fit` needs no extra argument for DDP."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's strided share of a global batch (sizes differ by at most one image)."""
        return batch[self.rank :: self.world_size] if self.distributed else batch

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks (a collective: every rank must call it)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
        return value


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass(frozen=True)
class TrainedModel:
    """What one training produced: the checkpoint (weights, architecture, normalisation, temperature) and its story."""

    checkpoint: dict
    history: list[EpochStats]
    seconds: float
    parameters: int
    model: nn.Module  # the trained network divided by its temperature, still on its training device, in eval mode

    @property
    def temperature(self) -> float:
        """The temperature that calibrates the model's probabilities (1.0: a checkpoint from before calibration)."""
        return float(self.checkpoint.get("temperature", 1.0))


def fit(
    split: NormalisedSplit,
    config: TrainingConfig,
    device: str = "cpu",
    mixed_precision: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainedModel:
    """THE way to train: seed, build, train on `split`'s train part (validating each epoch), fit the
    temperature that calibrates its probabilities on the validation part (`ml.calibrate`), checkpoint.

    Every caller (the `digit_classifier` asset, the benchmarks, the tests) trains through here, so the
    same `config` and data give the same model wherever it runs. `config.members` > 1 trains an ensemble.
    """
    if config.members > 1:
        return fit_ensemble(split, config, device, mixed_precision, on_epoch)
    seed_everything(config.seed)
    params = architectures.params_of(config.architecture, config)
    model = architectures.build(config.architecture, params)
    started = time.perf_counter()
    history = train(model, split, config, device, mixed_precision, on_epoch)
    temperature = fit_temperature(predict_logits(model, split.val_images, device), split.val_labels)
    seconds = time.perf_counter() - started
    checkpoint = make_checkpoint(model, config.architecture, params, split.mean, split.std, temperature)
    scaled = TemperatureScaled(model, temperature).eval()
    return TrainedModel(checkpoint, history, seconds, parameter_count(model), scaled)


def fit_ensemble(
    split: NormalisedSplit,
    config: TrainingConfig,
    device: str = "cpu",
    mixed_precision: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainedModel:
    """`config.members` networks, member i trained by `fit` with seed `config.seed + i` and its own temperature,
    assembled into one `DigitEnsemble` (the average of their calibrated probabilities), whose own temperature
    is then fitted on the validation split. Epochs are numbered on across the members."""
    members: list[TrainedModel] = []
    for index in range(config.members):
        offset = index * config.epochs
        report = (lambda stats, offset=offset: on_epoch(replace(stats, epoch=stats.epoch + offset))) if on_epoch else None
        members.append(fit(split, replace(config, members=1, seed=config.seed + index), device, mixed_precision, report))
    started = time.perf_counter()
    ensemble = assemble([member.model.network for member in members], [member.temperature for member in members])
    ensemble.to(device)
    temperature = fit_temperature(predict_logits(ensemble, split.val_images, device), split.val_labels)
    seconds = sum(member.seconds for member in members) + time.perf_counter() - started
    params = ensemble_params(config.architecture, architectures.params_of(config.architecture, config), config.members)
    checkpoint = make_checkpoint(ensemble, ENSEMBLE, params, split.mean, split.std, temperature)
    history = [replace(stats, epoch=stats.epoch + i * config.epochs) for i, m in enumerate(members) for stats in m.history]
    scaled = TemperatureScaled(ensemble, temperature).eval()
    return TrainedModel(checkpoint, history, seconds, parameter_count(ensemble), scaled)


def train(
    model: nn.Module,
    split: NormalisedSplit,
    config: TrainingConfig,
    device: str = "cpu",
    mixed_precision: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> list[EpochStats]:
    """Train `model` in place and return one `EpochStats` per epoch (`fit` is the entry point).

    `mixed_precision` means bf16 autocast where the device computes bf16 natively (`native_bf16`); elsewhere
    float32. Either way the same seed on the same machine gives the same weights.
    """
    target = torch.device(device)
    use_amp = mixed_precision and native_bf16(target)
    # channels-last: oneDNN's convolutions run about 1.5x faster per image on CPU in this layout (see
    # benchmarks/training_benchmark.py); the weights go back to the usual layout when training ends.
    model.to(target, memory_format=torch.channels_last)
    shard = Shard.current()
    network = _data_parallel(model, target, shard)
    x, y = _to_device(split.train_images, target), _to_device(split.train_labels, target)
    steps_per_epoch = (len(x) + config.batch_size - 1) // config.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.max_lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.max_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    generator = torch.Generator().manual_seed(config.seed)
    background = -split.mean / split.std  # a blank pixel, standardised: what augmentation fills in with
    history: list[EpochStats] = []
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=generator).to(target)
        total_loss = torch.zeros((), device=target)
        for start in range(0, len(x), config.batch_size):
            batch = order[start : start + config.batch_size]
            # the whole global batch is augmented on every rank (the generator stays in step across ranks), in
            # float32 outside autocast: the same warps whatever the precision of the network
            inputs = augment_batch(x[batch], config, generator, background)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, images = _shard_loss(network, shard.take(inputs), shard.take(y[batch]), len(batch), shard, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.detach() * images
        validate = shard.rank == 0  # rank 0's model is the one checkpointed; the others wait at the next step
        stats = EpochStats(
            epoch=epoch,
            train_loss=shard.total(total_loss).item() / len(x),
            val_accuracy=(
                accuracy(model, split.val_images, split.val_labels, device=device, mixed_precision=use_amp)
                if validate
                else float("nan")
            ),
            learning_rate=schedule.get_last_lr()[0],
            seconds=time.perf_counter() - started,
        )
        history.append(stats)
        if on_epoch:
            on_epoch(stats)
    model.to(memory_format=torch.contiguous_format)
    return history


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bf16 in hardware: a CUDA GPU that has it, or a CPU whose oneDNN kernels have it
    (AVX512-BF16 or AMX). There, bf16 autocast trains the default CNN in about 0.78x the float32 time per image
    (benchmarks/training_benchmark.py); emulated bf16 would be slower than float32, so it is never used."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _data_parallel(model: nn.Module, target: torch.device, shard: Shard) -> nn.Module:
    """`model` itself, or wrapped in `DistributedDataParallel` (which averages gradients over the ranks)."""
    if not shard.distributed:
        return model
    device_ids = [torch.cuda.current_device()] if target.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _shard_loss(
    network: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, global_size: int, shard: Shard, config: TrainingConfig
) -> tuple[torch.Tensor, int]:
    """The loss to backpropagate, and the number of images it covers (for the epoch's mean loss).

    Single process: the batch mean. DDP: this rank's summed loss scaled so that DDP's gradient average
    over the ranks is exactly the mean over the global batch, even when the shares differ by one image.
    """
    if not shard.distributed:
        return F.cross_entropy(network(inputs), labels, label_smoothing=config.label_smoothing), len(labels)
    summed = F.cross_entropy(network(inputs), labels, label_smoothing=config.label_smoothing, reduction="sum")
    return summed * shard.world_size / global_size, global_size / shard.world_size


def augment_batch(images: torch.Tensor, config: TrainingConfig, generator: torch.Generator, background: float):
    """`config.augmentation` applied to one batch, its randomness drawn from the training's `generator`."""
    if config.augmentation == "shift":
        return random_shift(images, config.max_shift, generator) if config.max_shift else images
    if config.augmentation == "affine":
        return augment.random_affine(images, generator, background)
    if config.augmentation == "elastic":
        return augment.random_elastic(images, generator, background)
    if config.augmentation == "robust":
        return augment.random_robust(images, generator, background)
    if config.augmentation == "none":
        return images
    raise ValueError(f"unknown augmentation {config.augmentation!r}; choose one of {', '.join(augment.AUGMENTATIONS)}")


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random whole number of pixels in [-max_shift, max_shift], zero-filled."""
    n, _, height, width = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator).to(images.device)
    rows = (torch.arange(height, device=images.device).view(1, height) - shifts[0].view(n, 1)).clamp_(-1, height)
    cols = (torch.arange(width, device=images.device).view(1, width) - shifts[1].view(n, 1)).clamp_(-1, width)
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    padded = torch.cat([images, background.expand(n, 1, height, 1)], dim=3)
    padded = torch.cat([padded, background.expand(n, 1, 1, width + 1)], dim=2)
    rows = torch.where((rows < 0) | (rows >= height), height, rows)
    cols = torch.where((cols < 0) | (cols >= width), width, cols)
    return padded[torch.arange(n, device=images.device).view(n, 1, 1), 0, rows.view(n, height, 1), cols.view(n, 1, width)].unsqueeze(1)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, device: str = "cpu", batch_size: int = 2048, mixed_precision: bool = False
) -> torch.Tensor:
    """Logits for every image, in eval mode, returned on the CPU.

    float32 by default: the accuracy gate must judge the model as the float32 ONNX graph will serve it.
    """
    model.eval()
    target = torch.device(device)
    use_amp = mixed_precision and target.type == "cuda"
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = _to_device(images[start : start + batch_size], target)
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0, 10)


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str = "cpu", mixed_precision: bool = False
) -> float:
    if len(labels) == 0:
        return float("nan")
    logits = predict_logits(model, images, device, mixed_precision=mixed_precision)
    return (logits.argmax(1) == labels).float().mean().item()
