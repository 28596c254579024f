"""Plain data (YAML, ``--set`` strings) to typed dataclass fields: the one coercer of the run config and the
scheme registry.

:func:`coerce` converts a value to a field's type hint or raises :class:`ConfigError` naming ``where`` (a dotted
config key such as ``loss.beta``, or ``scheme 'copo' parameter 'k'``). The rules, chosen for values that come
from YAML files and command lines:

=================  =========================================================================================
type               accepted
=================  =========================================================================================
``float``          numbers and numeric strings (PyYAML reads ``2e-4`` without a dot as a string); not bools
``int``            ints, integral floats and numeric strings (``3.0``, ``"4"``); not bools
``bool``           bools and the strings true/false/yes/no/on/off/y/n/1/0 (any case); not numbers
``str``            anything but a list or a mapping (``5`` becomes ``"5"``)
``Literal[...]``   one of the choices, or its string form
``X | None``       ``None`` or the strings none/null/~/"" (any case), else ``X``
``list[X]``        a list or tuple, items coerced to ``X``; ``tuple[X, ...]`` likewise, as a tuple
``dict`` / mapping a mapping (values unchanged)
a dataclass        a mapping, built field by field (:func:`build_dataclass`) with unknown keys refused
``Any`` / other    unchanged
=================  =========================================================================================
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

__all__ = ["ConfigError", "coerce", "build_dataclass", "unknown_key"]

_TRUE = {"true", "yes", "on", "1", "y"}
_FALSE = {"false", "no", "off", "0", "n"}
_NONE = {"none", "null", "~", ""}


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key (or the scheme parameter)."""


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to the type hint ``tp`` (module docstring), or :class:`ConfigError` naming ``where``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NONE)
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is list:
            (item,) = args or (Any,)
            return [coerce(v, item, f"{where}.{i}") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(
            coerce(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value)))
        )
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in (bool, int, float, str) and value is None:
        raise ConfigError(f"{where}: a value is required (got null)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (Mapping, list, tuple)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def unknown_key(cls: type, name: str, prefix: str) -> ConfigError:
    """The error for a key ``cls`` has no field for, with the closest valid name."""
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{prefix}{name}: unknown key{hint} (valid keys: {', '.join(valid)})")


def build_dataclass(cls: type, data: Mapping[str, Any], key: str = "") -> Any:
    """``cls(**data)`` with every value coerced to its field's type; unknown keys raise naming ``key.name``."""
    prefix = f"{key}." if key else ""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            raise unknown_key(cls, str(name), prefix)
        kwargs[name] = coerce(value, hints[name], prefix + name)
    return cls(**kwargs)
