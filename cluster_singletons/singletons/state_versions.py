"""Schema versions of typed state: declaration, validation and upgrade (pure functions).

A state model is a pydantic model that may declare::

    class Progress(BaseModel):
        schema_version: ClassVar[int] = 2
        upgrades: ClassVar[Mapping[int, Upgrade]] = {1: progress_v1_to_v2}

``upgrades[n]`` turns the JSON object of version ``n`` into that of version ``n + 1``; it
must be pure. Models without ``schema_version`` are version 1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


def version_of(model: type[BaseModel]) -> int:
    return int(getattr(model, "schema_version", 1))


def upgrades_of(model: type[BaseModel]) -> Mapping[int, Upgrade]:
    return dict(getattr(model, "upgrades", {}) or {})


def problems(model: object) -> list[str]:
    """What is wrong with ``model`` as a state model (empty when it is fine)."""
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return [f"state must be a pydantic BaseModel subclass, not {model!r}"]
    found = []
    version = getattr(model, "schema_version", 1)
    if not isinstance(version, int) or version < 1:
        return [f"{model.__name__}.schema_version must be an int >= 1, not {version!r}"]
    steps = upgrades_of(model)
    for older in range(1, version):
        if older not in steps:
            found.append(
                f"{model.__name__} is schema version {version} but has no upgrade from "
                f"version {older} (add upgrades[{older}])"
            )
        elif not callable(steps[older]):
            found.append(f"{model.__name__}.upgrades[{older}] is not callable")
    extra = sorted(v for v in steps if not (isinstance(v, int) and 1 <= v < version))
    if extra:
        found.append(f"{model.__name__}.upgrades has steps for unknown versions {extra}")
    return found


@dataclass(frozen=True, kw_only=True)
class Decoded:
    value: BaseModel
    upgraded_from: int | None


class DecodeError(Exception):
    """A stored value that this code cannot turn into the model; the row must be kept."""


def decode(model: type[BaseModel], text: str, stored_version: int) -> Decoded:
    """Parse stored JSON of ``stored_version`` into ``model``, chaining upgrades.

    Raises ``DecodeError`` for invalid JSON, a version newer than the code knows (never
    truncated silently), an upgrade that fails, or a value the model rejects.
    """
    target = version_of(model)
    if stored_version > target:
        raise DecodeError(
            f"stored schema version {stored_version} is newer than {model.__name__}'s "
            f"{target}: deploy the newer code, or reset the state"
        )
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"stored value is not valid JSON: {exc}") from exc
    steps = upgrades_of(model)
    for version in range(stored_version, target):
        try:
            data = steps[version](data)
        except Exception as exc:
            raise DecodeError(f"upgrade from version {version} failed: {exc!r}") from exc
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        raise DecodeError(f"stored value does not match {model.__name__}: {exc}") from exc
    return Decoded(value=value, upgraded_from=stored_version if stored_version < target else None)
