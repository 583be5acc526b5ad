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
    _refuse_newer(model, stored_version)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"stored value is not valid JSON: {exc}") from exc
    return _decode_data(model, data, stored_version, refuse_unknown=False)


#: The keys of an exported value: ``{"schema_version": n, "value": {...}}``.
ENVELOPE = frozenset({"schema_version", "value"})


def exported(text: str, stored_version: int) -> str:
    """A stored value as exported: with the schema version it was stored at."""
    try:
        value: Any = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"stored value is not valid JSON: {exc}") from exc
    return json.dumps({"schema_version": stored_version, "value": value})


def decode_import(model: type[BaseModel], text: str, version: int | None = None) -> BaseModel:
    """An operator's value for ``model``: an export (``ENVELOPE``, decoded through the
    upgrades from its version), or a bare value at ``version`` (None: the model's own).

    Stricter than ``decode``: a field the model does not know is refused, never dropped.
    Raises ``DecodeError``.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from exc
    if isinstance(data, dict) and set(data) == ENVELOPE:
        version, data = data["schema_version"], data["value"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DecodeError(f"schema_version must be an int >= 1, not {version!r}")
    version = version_of(model) if version is None else version
    _refuse_newer(model, version)
    return _decode_data(model, data, version, refuse_unknown=True).value


def _refuse_newer(model: type[BaseModel], version: int) -> None:
    if version > version_of(model):
        raise DecodeError(
            f"schema version {version} is newer than {model.__name__}'s "
            f"{version_of(model)}: deploy the newer code, or reset the state"
        )


def _decode_data(
    model: type[BaseModel], data: Any, version: int, *, refuse_unknown: bool
) -> Decoded:
    target = version_of(model)
    steps = upgrades_of(model)
    for step in range(version, target):
        try:
            data = steps[step](data)
        except Exception as exc:
            raise DecodeError(f"upgrade from version {step} failed: {exc!r}") from exc
    if refuse_unknown:
        _refuse_unknown(model, data)
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        what = "value" if refuse_unknown else "stored value"
        raise DecodeError(f"{what} does not match {model.__name__}: {exc}") from exc
    return Decoded(value=value, upgraded_from=version if version < target else None)


def _refuse_unknown(model: type[BaseModel], data: Any) -> None:
    """A field ``model`` does not know (at its own version) is an error, not a drop."""
    if not isinstance(data, dict) or model.model_config.get("extra") == "allow":
        return
    known = set()
    for name, info in model.model_fields.items():
        known.add(name)
        if isinstance(info.alias, str):
            known.add(info.alias)
        if isinstance(info.validation_alias, str):
            known.add(info.validation_alias)
    unknown = sorted(set(data) - known)
    if unknown:
        raise DecodeError(
            f"{model.__name__} has no field {', '.join(map(repr, unknown))} "
            f"(its fields: {', '.join(sorted(model.model_fields)) or 'none'})"
        )
