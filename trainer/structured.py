"""Typed config dataclasses <-> OmegaConf, with errors that name the key.

The config dataclasses use `Literal` for choices, which OmegaConf cannot hold, so
Hydra gets a mirror of each dataclass with `Literal[...]` relaxed to its base type
(`schema_of`). That mirror still rejects unknown keys and wrongly typed values while
Hydra composes; `build` then turns the composed container into the real dataclasses,
checking every `Literal` choice and calling each one's `validate()`, so a bad value
stops the run before any process group exists, with a message like
`attention.kind='softmx' is not one of ['softmax', 'linear', ...]`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

_SCHEMAS: dict[type, type] = {}


def _relax(t):
    origin = get_origin(t)
    if origin is Literal:
        return type(get_args(t)[0])
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in get_args(t) if a is not type(None)]
        inner = _relax(args[0]) if len(args) == 1 else Any
        return typing.Optional[inner] if type(None) in get_args(t) else inner
    if origin in (list, typing.List):
        (arg,) = get_args(t) or (Any,)
        return typing.List[_relax(arg)]
    if dataclasses.is_dataclass(t):
        return schema_of(t)
    return t


def schema_of(cls: type) -> type:
    """The OmegaConf-compatible mirror of dataclass `cls` (memoised)."""
    if cls in _SCHEMAS:
        return _SCHEMAS[cls]
    hints = get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        t = _relax(hints[f.name])
        if dataclasses.is_dataclass(hints[f.name]):
            fields.append((f.name, t, dataclasses.field(default_factory=t)))
        elif f.default_factory is not dataclasses.MISSING:
            fields.append((f.name, t, dataclasses.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, t, dataclasses.field(default=f.default)))
    mirror = dataclasses.make_dataclass(cls.__name__ + "Schema", fields)
    mirror.__doc__ = cls.__doc__
    _SCHEMAS[cls] = mirror
    return mirror


def _coerce(t, value, key: str):
    origin = get_origin(t)
    if origin is Literal:
        choices = list(get_args(t))
        if value not in choices:
            raise ValueError(f"{key}={value!r} is not one of {choices}")
        return value
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        if value is None and type(None) in get_args(t):
            return None
        args = [a for a in get_args(t) if a is not type(None)]
        return _coerce(args[0], value, key) if len(args) == 1 else value
    if origin in (list, typing.List):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        (arg,) = get_args(t) or (Any,)
        return [_coerce(arg, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return build(t, value, key)
    if t is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    return value


def require(ok: bool, key: str, rule: str, value) -> None:
    """The one style of config check: raises ValueError('<key> must <rule>, got <value>') unless ok."""
    if not ok:
        raise ValueError(f"{key} must {rule}, got {value!r}")


class ConfigError(ValueError):
    """A configuration that cannot run; its message names the key and the value. The
    entry point prints it as one line and exits with status 2."""


def build(cls: type, data: dict, key: str = ""):
    """Constructs dataclass `cls` from a plain dict, checking keys, types and choices."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for k in data:
        if k not in names:
            raise ValueError(f"{prefix}{k}: unknown key (known: {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj
