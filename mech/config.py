"""One config system: frozen dataclasses, built from plain dicts / YAML with every key checked.

A key that no field has is an error that names it and suggests the nearest field, so a typo in a sweep
file never silently falls back to a default. Values are coerced strictly: a bool is not an int, a float is
not an int (``rank: 4.0`` would hash apart from ``rank: 4``) and a string is not a number, because YAML
turns ``0.5``, ``true`` and ``"8"`` into three different things and a silent conversion hides the typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from mech.errors import MechError

T = TypeVar("T")

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _hint(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"did you mean {close[0]!r}? " if close else ""


def from_dict(cls: type[T], data: dict | None, where: str = "config", base: T | None = None) -> T:
    """Build dataclass ``cls`` from ``data`` (missing keys keep their defaults, or ``base``'s values when a base
    instance is given), recursing into nested dataclass fields; unknown keys and wrongly-typed scalars raise
    MechError."""
    data = {} if data is None else data
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise MechError(f"{where} must be a mapping of field names to values, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise MechError(f"unknown key {where}.{key}: {_hint(key, list(fields))}valid keys are {', '.join(fields)}")
        tp = hints[key]
        if base is not None and dataclasses.is_dataclass(tp):  # overrides of a nested part keep base's other fields
            kwargs[key] = from_dict(tp, value, f"{where}.{key}", base=getattr(base, key))
        else:
            kwargs[key] = _coerce(tp, value, f"{where}.{key}")
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def _describe(tp: Any) -> str:
    """``int | None`` -> "an integer or null": how a message names an expected type."""
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is tuple or typing.get_origin(tp) is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    # bool is a subclass of int in Python, and YAML reads `yes` as True: never let it pass as a number
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # `lr: 1` means 1.0; the converse (4.0 as an int) is refused
    if not ok:
        raise MechError(f"{where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__}): fix the value")
    return value


def _coerce_tuple(tp: Any, value: Any, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise MechError(f"{where}: expected a list, got {value!r}: write it as [a, b, ...]")
    args = typing.get_args(tp)
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise MechError(f"{where}: expected a list of {len(args)} values, got {len(value)}: {value!r}")
    return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:  # `teacher: null` or a null list item is a slip, not "all defaults"
            raise MechError(f"{where}: expected a mapping of {tp.__name__} fields, got null: give the fields or "
                            "drop the key")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for a in (a for a in typing.get_args(tp) if a is not type(None)):
            try:
                return _coerce(a, value, where)
            except MechError:
                continue
        raise MechError(f"{where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__}): fix the value")
    if tp in _TYPE_NAMES:
        return _coerce_scalar(tp, value, where)
    if tp is tuple or origin is tuple:
        return _coerce_tuple(tp, value, where)
    return value


class _DuplicateKey(ValueError):
    pass


@functools.cache
def _unique_key_loader() -> Any:
    """A SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # SafeLoader itself refuses an unhashable key, with its own message
                if key in seen:
                    raise _DuplicateKey(f"key {key!r} is given twice (again on line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_yaml(path: str | Path) -> dict:
    """The mapping in YAML file ``path``; a missing, unreadable, empty or malformed file is one MechError."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise MechError(f"config {path} is a directory: pass the YAML file itself")
    if not p.is_file():
        raise MechError(f"config file {path} not found: check the path")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MechError(f"{path} is not UTF-8 text (byte {e.start}): save the YAML as UTF-8") from None
    except OSError as e:
        raise MechError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as e:
        raise MechError(f"{path}: {e}: keep one of them") from None
    except yaml.YAMLError as e:
        raise MechError(f"{path} is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
    if data is None:
        raise MechError(f"{path} is empty: write the config's fields into it (an empty file does not mean "
                        "'use the defaults')")
    if not isinstance(data, dict):
        raise MechError(f"{path} must be a mapping of config fields, got a YAML {type(data).__name__}")
    return data


def load_dataclass_yaml(cls: type[T], path: str | Path, base: T | None = None) -> T:
    """``cls`` from a YAML file of overrides: of ``cls``'s defaults, or of ``base`` when given."""
    return from_dict(cls, load_yaml(path), where=Path(path).stem, base=base)
