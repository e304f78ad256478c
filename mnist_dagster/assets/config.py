"""`digit_classifier`'s Dagster config, generated from the plain dataclass of defaults in `mnist_dagster.ml`.

The launchpad shows `candidate` (one of the named configs in `ml.config.CANDIDATES`, `cnn-fast` by
default) and every field of `ml.config.TrainingConfig` with its doc; a field left unset takes the
candidate's value, a field set overrides it. Nothing maps one field to another by hand, so a knob
added to `TrainingConfig` appears here.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Optional

import dagster as dg
import pydantic

from mnist_dagster.ml.config import CANDIDATES, DEFAULT_CANDIDATE
from mnist_dagster.ml.config import TrainingConfig as PlainTrainingConfig
from mnist_dagster.ml.config import candidate as named_candidate

CandidateName = Literal[tuple(CANDIDATES)]  # type: ignore[valid-type]


def _config_type(annotation: Any) -> Any:
    """What Dagster config can hold: lists, not tuples; a string for a choice (checked by `from_mapping`)."""
    if typing.get_origin(annotation) is tuple:
        return list[typing.get_args(annotation)[0]]
    if typing.get_origin(annotation) is Literal:
        return str
    return annotation


def _override_fields(source: type, defaults: Any) -> dict[str, Any]:
    """Each field of the dataclass `source` as an optional override, its doc naming `defaults`' value."""
    hints = typing.get_type_hints(source)
    definitions: dict[str, Any] = {}
    for item in dataclasses.fields(source):
        default = getattr(defaults, item.name)
        shown = list(default) if isinstance(default, tuple) else default
        doc = f"{item.metadata.get('doc', item.name)}. Unset: the candidate's value ({DEFAULT_CANDIDATE}: {shown})"
        definitions[item.name] = (Optional[_config_type(hints[item.name])], pydantic.Field(None, description=doc))
    return definitions


TrainingConfig = pydantic.create_model(
    "TrainingConfig",
    __base__=dg.Config,
    __doc__="Which candidate to train, and any field to override in it.",
    __module__=__name__,
    candidate=(CandidateName, pydantic.Field(DEFAULT_CANDIDATE, description="a named config: " + ", ".join(CANDIDATES))),
    **_override_fields(PlainTrainingConfig, CANDIDATES[DEFAULT_CANDIDATE]),
)


def training_config(config: dg.Config) -> PlainTrainingConfig:
    """The launchpad's values as the plain dataclass that `ml.train.fit` takes: the candidate, overridden."""
    values = config.model_dump()
    overrides = {key: value for key, value in values.items() if key != "candidate" and value is not None}
    return named_candidate(values["candidate"], **overrides)
