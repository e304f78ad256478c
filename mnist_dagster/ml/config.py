"""The one block of training defaults: every knob of a training run, in plain Python.

As in nanoGPT, defaults live in one place and a run overrides what it needs:
`dataclasses.replace(TrainingConfig(), epochs=1)` in a script or test, the launchpad in Dagster, whose
`digit_classifier` config is generated from this class (`mnist_dagster.assets.config`), never typed
again. No torch here: the code location reads these defaults while it loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


def knob(default: Any, doc: str) -> Any:
    """A field with a default and the sentence a person reads in the launchpad."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class TrainingConfig:
    """The defaults give the README's numbers: >= 99.3% test accuracy in about 30 s on 2 CPU cores."""

    channels: tuple[int, ...] = knob((16, 32), "output channels of each conv-BN-ReLU-max-pool stage")
    hidden: int = knob(128, "width of the MLP head's hidden layer")
    dropout: float = knob(0.1, "dropout before the output layer")
    epochs: int = knob(3, "passes over the training split")
    batch_size: int = knob(128, "images per optimiser step")
    max_lr: float = knob(0.01, "peak learning rate of the one-cycle schedule (AdamW)")
    weight_decay: float = knob(5e-4, "AdamW weight decay")
    label_smoothing: float = knob(0.1, "cross-entropy label smoothing")
    max_shift: int = knob(2, "random translation augmentation, in pixels (0 = off)")
    seed: int = knob(0, "seeds weights, batch order, dropout and augmentation: same seed, same model")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainingConfig:
        """From plain values (Dagster config, JSON, MLflow params): lists become the tuples used here."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

    def as_params(self) -> dict[str, Any]:
        """Flat, JSON-friendly values (MLflow params, metadata)."""
        return {f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value for f in fields(self)}
