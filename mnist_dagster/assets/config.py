"""Dagster config generated from the plain dataclasses of defaults in `mnist_dagster.ml`.

The launchpad shows exactly the fields, defaults and docs of `ml.config.TrainingConfig`; nothing maps
one field to another by hand, so a knob added there appears here.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import dagster as dg
import pydantic

from mnist_dagster.ml.config import TrainingConfig as PlainTrainingConfig


def _config_type(annotation: Any) -> Any:
    """Dagster config has lists, not tuples: `tuple[int, ...]` becomes `list[int]`."""
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    return annotation


def mirror_dataclass(source: type, name: str) -> type[dg.Config]:
    """A `dg.Config` named `name` with `source`'s fields, defaults and docs (`knob` metadata)."""
    hints = typing.get_type_hints(source)
    definitions: dict[str, Any] = {}
    for item in dataclasses.fields(source):
        default = list(item.default) if isinstance(item.default, tuple) else item.default
        description = item.metadata.get("doc")
        definitions[item.name] = (_config_type(hints[item.name]), pydantic.Field(default, description=description))
    return pydantic.create_model(name, __base__=dg.Config, __doc__=source.__doc__, __module__=__name__, **definitions)


TrainingConfig = mirror_dataclass(PlainTrainingConfig, "TrainingConfig")


def training_config(config: dg.Config) -> PlainTrainingConfig:
    """The launchpad's values as the plain dataclass that `ml.train.fit` takes."""
    return PlainTrainingConfig.from_mapping(config.model_dump())
