"""The machine learning, plain PyTorch: data, models, training, evaluation, drift statistics, plots.

Submodules load on first attribute access (PEP 562, the SPEC 1 / `lazy_loader` pattern of scipy and
scikit-image): `from mnist_dagster import ml` costs nothing, and `ml.data.fetch_mnist(...)` imports
`ml.data`, and torch with it, at that first call. The Dagster side (assets, resources, sensors) writes
`from mnist_dagster import ml` at its top, so loading the code location never loads torch, scipy or
matplotlib; a step loads them when it runs. `from mnist_dagster.ml import data` and
`import mnist_dagster.ml.data` work as usual (eagerly). The `TYPE_CHECKING` imports below let type
checkers and IDEs see the submodules.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mnist_dagster.ml import (
        architectures,
        augment,
        calibrate,
        cbpe,
        compare,
        config,
        data,
        distributed,
        drift,
        evaluate,
        model,
        plots,
        robustness,
        train,
    )

__all__ = [
    "architectures", "augment", "calibrate", "cbpe", "compare", "config", "data", "distributed", "drift",
    "evaluate", "model", "plots", "robustness", "train",
]  # fmt: skip
SUBMODULES = frozenset(__all__)


def __getattr__(name: str) -> ModuleType:
    """`ml.<submodule>`, imported on first access; the import system then keeps it as an attribute."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *SUBMODULES])
