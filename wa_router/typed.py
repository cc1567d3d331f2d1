"""YAML data to frozen dataclasses, by their annotations. Pure; every error is a
ConfigError naming the dotted key, and a key the dataclass does not have is an error (a
typo must not be silently ignored)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

from .errors import ConfigError

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def build(tp: Any, value: Any, key: str) -> Any:
    """Convert YAML data to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return build(args[0], value, key)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"must be a mapping, got {_kind(value)}")
        hints = _hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        for k in value:
            if k not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(_join(key, str(k)), f"unknown key (known here: {known})")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(tp):
            sub = _join(key, f.name)
            if f.name in value:
                kwargs[f.name] = build(hints[f.name], value[f.name], sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(sub, "is required")
        return tp(**kwargs)
    if origin is tuple:
        (item_tp, _) = get_args(tp)
        if isinstance(value, str | int | float) and item_tp is str:
            value = [value]  # `methods: GET` reads as a one-element list
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {_kind(value)}")
        return tuple(build(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(key, f"must be a string, got {_kind(value)}")
        return str(value)
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover - schema bug


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
