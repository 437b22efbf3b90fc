"""An app's config schema (from its manifest) against the values an operator sets.

Values arrive as JSON, or as strings from `osless config set KEY=VALUE`; each is coerced to the
declared type or refused with a message naming the key and the type it expects.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MASK", "coerce", "misfits"]

MASK = "********"
TYPES = ("str", "int", "float", "bool", "json", "secret")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def coerce(key: str, spec: dict[str, Any], value: Any) -> Any:
    """`value` as the type `spec` declares; ValueError says what was expected (never echoing a secret)."""
    kind = spec.get("type")
    shown = "the value" if kind == "secret" else repr(value)
    if kind in ("str", "secret"):
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {shown}")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {shown}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(f"{key}: expected an integer, got {shown}")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
                if math.isfinite(number):
                    return number
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {shown}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{key}: expected a boolean (true or false), got {shown}")
    if kind == "json":
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as e:
                raise ValueError(f"{key}: expected JSON, got {shown} ({e})") from e
        return value
    raise ValueError(f"{key}: the schema declares an unknown type {kind!r}")


def misfits(schema: dict[str, dict[str, Any]], values: dict[str, Any]) -> list[str]:
    """What stops `values` from fitting `schema`: a wrong type, or a required key with no value."""
    problems = []
    for key, spec in sorted(schema.items()):
        if key in values:
            try:
                coerce(key, spec, values[key])
            except ValueError as e:
                problems.append(str(e))
        elif spec.get("required"):
            problems.append(f"{key}: required and not set")
    return problems
