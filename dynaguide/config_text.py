"""RefineConfig fields from text: ``--set KEY=VALUE`` and ``--config FILE``.

Each value is parsed by the type of its :class:`~dynaguide.config.RefineConfig` field:
``int`` and ``float`` as numbers, ``bool`` from ``true/false/yes/no/on/off/1/0``, a
``Literal`` as one of its choices, ``X | None`` as ``none``/``null`` or an ``X``,
``tuple[int, int]`` from ``3,26`` or ``[3, 26]`` and a ``dict`` from JSON. The config's own
validation then checks the ranges. A config file is TOML (``.toml``; Python 3.11's
``tomllib``) or JSON (``.json``) holding field names at the top level and, optionally,
``preset = "<name>"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from dynaguide.config import RefineConfig

__all__ = ["field_names", "load_config_file", "parse_assignment", "parse_field"]

#: Fields the command line may not set (``name`` labels a preset; it decides nothing).
_NOT_SETTABLE = frozenset({"name"})
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def field_names() -> list[str]:
    """The RefineConfig fields ``--set`` and ``--config`` accept, sorted."""
    return sorted(f.name for f in dataclasses.fields(RefineConfig) if f.name not in _NOT_SETTABLE)


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(RefineConfig)


def _convert(text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint`` (ValueError with what was expected)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for alt in (a for a in args if a is not type(None)):
            try:
                return _convert(text, alt)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" or ".join(errors) + (" or 'none'" if type(None) in args else ""))
    if origin is Literal:
        for choice in args:
            if text.strip() == str(choice):
                return choice
        raise ValueError(f"one of {', '.join(str(a) for a in args)}")
    if hint is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError("true or false")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("a number") from None
    if hint is str:
        return text
    if origin is tuple:
        raw = text.strip()
        parts = json.loads(raw) if raw.startswith("[") else [p for p in raw.split(",") if p.strip()]
        if not isinstance(parts, list) or len(parts) != len(args):
            raise ValueError(f"{len(args)} comma-separated values")
        return tuple(_convert(str(p), a) for p, a in zip(parts, args, strict=True))
    if origin is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("a JSON object") from None
        if not isinstance(value, dict):
            raise ValueError("a JSON object")
        return value
    raise ValueError(f"a value of type {hint}")  # pragma: no cover - every field is covered


def _check_key(key: str, where: str) -> str:
    name = key.strip()
    if name not in field_names():
        raise ValueError(
            f"{where}: unknown setting {name!r}; settable RefineConfig fields: "
            + ", ".join(field_names())
        )
    return name


def parse_field(key: str, text: str, *, where: str = "--set") -> tuple[str, Any]:
    """``(field, value)`` for the text ``text`` of RefineConfig field ``key``.

    Raises
    ------
    ValueError
        An unknown field (the message lists the settable ones) or a value that does not
        parse as the field's type (the message names the field and what it expects).
    """
    name = _check_key(key, where)
    try:
        return name, _convert(text, _hints()[name])
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} {name}={text!r}: expected {exc}") from None


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (one ``--set``) as ``(field, typed value)``; see :func:`parse_field`."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    return parse_field(key, raw)


def _from_data(name: str, value: Any, where: str) -> Any:
    """A file's already-typed value, with text and lists converted where the field needs it."""
    hint = _hints()[name]
    if isinstance(value, str) and hint is not str and typing.get_origin(hint) is not Literal:
        return parse_field(name, value, where=where)[1]
    if isinstance(value, list) and typing.get_origin(hint) is tuple:
        return tuple(value)
    return value


def load_config_file(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any]]:
    """``(preset or None, {field: value})`` from a TOML or JSON config file.

    Raises
    ------
    ValueError
        An unsupported extension, a file that does not parse, a top level that is not a
        table/object, or an unknown key (each message names the file).
    OSError
        The file cannot be read.
    """
    p = Path(path)
    where = f"config file {str(p)!r}"
    ext = p.suffix.lower()
    data = p.read_bytes()
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"{where}: reading TOML needs Python 3.11+; use JSON") from None
        try:
            table = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{where}: invalid TOML: {exc}") from None
    elif ext == ".json":
        try:
            table = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: invalid JSON: {exc}") from None
    else:
        raise ValueError(f"{where}: expected a .toml or .json file, got {ext or 'no extension'!r}")
    if not isinstance(table, dict):
        raise ValueError(f"{where}: the top level must be a table of settings")
    preset = table.pop("preset", None)
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"{where}: preset must be a preset name, got {preset!r}")
    fields = {}
    for key, value in table.items():
        name = _check_key(str(key), where)
        fields[name] = _from_data(name, value, where)
    return preset, fields
