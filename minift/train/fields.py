"""Typed settings from TOML tables and `--set` strings: the one place where text becomes a dataclass field.

Lesson
------
Every table of a run config — [model], [task], [data], [train], and each method's options under
[method] — is a dataclass whose annotations are the schema. Reading a table is three checks per key:

    key known?         "lr" in fields(TrainConfig)            else: unknown field train.lrr (did you mean 'lr'?)
    value converts?    "3e-4" -> float 0.0003                 else: train.lr: expected float, got 'fast'
    (range checks)     left to the section's own validation, which then names the field the same way

TOML already gives typed values (3, 0.1, true, ["q", "v"]); a `--set section.field=value` gives a string,
converted here to the declared type: int, float, bool, str, list[str] / list[int], `X | None` ("none"
clears it), and `str | list[str]` (a TOML list stays a list, anything else stays a string — LoRA's
targets are either a list of names or one regex).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from typing import Any


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def field_names(target) -> list[str]:
    return [f.name for f in dataclasses.fields(target)]


def check_field(target, section: str, name: str, where: str) -> None:
    """An error naming `section.name`, the closest real field and all fields, if `name` is not a field."""
    names = field_names(target)
    if name not in names:
        has = f"[{section}] has {', '.join(names)}" if names else f"[{section}] takes no options"
        raise ValueError(f"{where}: unknown field {section}.{name}{suggest(name, names)}; {has}")


def field_type(target, name: str):
    cls = target if isinstance(target, type) else type(target)
    return typing.get_type_hints(cls)[name]


def parse_literal(text: str) -> Any:
    """A --set value read as a TOML value (3, 0.1, true, ["q", "v"]) when it is one, else the string itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def coerce(value: Any, annotation, where: str) -> Any:
    """Convert a TOML value or a --set string to the declared type; a mismatch is an error naming `where`."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    choices = [a for a in args if a is not type(None)] if args and typing.get_origin(annotation) is not list else []
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: may not be empty")
    if len(choices) == 2 and str in choices and any(typing.get_origin(c) is list for c in choices):
        parsed = parse_literal(value) if isinstance(value, str) else value  # str | list[str]
        if isinstance(parsed, list):
            return coerce(parsed, list[str], where)
        return coerce(value, str, where)
    inner = choices[0] if len(choices) == 1 else annotation
    try:
        return _convert(value, inner)
    except (TypeError, ValueError):
        kind = _type_name(inner)
        raise ValueError(f"{where}: expected {kind}{' or none' if optional else ''}, got {value!r}") from None


def _convert(value: Any, inner) -> Any:
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError
    if inner is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if inner is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if inner is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    if typing.get_origin(inner) is list:
        (element,) = typing.get_args(inner) or (str,)
        if isinstance(value, str):
            parsed = parse_literal(value)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError
        return [_convert(v, element) for v in value]
    return value


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is list:
        (element,) = typing.get_args(annotation) or (str,)
        return f"a list of {element.__name__}"
    return getattr(annotation, "__name__", str(annotation))


def table_to_dataclass(cls, table: dict, section: str, where: str):
    """An instance of `cls` from a table: every key checked and converted; missing keys keep their defaults."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}: [{section}] must be a table, got {type(table).__name__}")
    values = {}
    for key, value in table.items():
        check_field(cls, section, key, where)
        values[key] = coerce(value, field_type(cls, key), f"{where}: {section}.{key}")
    return cls(**values)
