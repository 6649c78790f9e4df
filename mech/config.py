"""One config system: frozen dataclasses, built from plain dicts / YAML with every key checked.

A key that no field has is an error that names it and suggests the nearest field, so a typo in a sweep
file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, TypeVar

from mech.errors import MechError

T = TypeVar("T")


def _hint(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def from_dict(cls: type[T], data: dict | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data`` (missing keys keep their defaults), recursing into nested
    dataclass fields; unknown keys and wrongly-typed scalars raise MechError."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise MechError(f"{where} must be a mapping of field names to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise MechError(f"unknown key {where}.{key}: {_hint(key, list(fields))}valid keys are {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args:
            try:
                return _coerce(a, value, where)
            except MechError:
                continue
        raise MechError(f"{where}: {value!r} does not fit {tp}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise MechError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MechError(f"{where}: expected a list, got {value!r}")
        return tuple(value)
    return value


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MechError(f"config file {path} not found: check the path")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise MechError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
    return data or {}


def load_dataclass_yaml(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, load_yaml(path), where=Path(path).stem)
