"""Typed configuration declared in code: `settings = app.config(greeting=str, ...)`.

The values live in one process-wide store that the runtime replaces with `apply()` whenever the
platform pushes a change; `Settings` reads through it on every attribute access, so app code sees a
new value on its next read without a restart.
"""

from __future__ import annotations

import copy
import json
import keyword
import math
import os
import re
import weakref
from collections.abc import Mapping
from typing import Any, Final

from osless.sdk.errors import ConfigError, UsageError

__all__ = ["JSON", "Field", "Secret", "Settings", "apply", "current_version"]

# Keys become attributes and `KEY=value` words on the command line.
KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_RESERVED = frozenset({"as_dict"})
_MASK = "'***'"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()


class _Marker:
    """A type for `app.config(...)` that has no Python value type of its own."""

    def __new__(cls, *args: object, **kwargs: object) -> _Marker:
        raise TypeError(f"osless.{cls.__name__} is a type for app.config(...), not a value")


class Secret(_Marker):
    """A secret string: set with `osless config set`, read as a plain `str`, masked in reprs."""


class JSON(_Marker):
    """Any JSON value: dict, list, str, int, float, bool or None."""


# Manifest names of the supported types.
_TYPE_NAMES: dict[type[Any], str] = {
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    JSON: "json",
    Secret: "secret",
}
_TYPES_HINT = "use str, int, float, bool, osless.JSON or osless.Secret"


class Field:
    """A config key with options: `osless.Field(int, default=10, restart=True, doc="...")`."""

    __slots__ = ("default", "doc", "restart", "type")

    def __init__(
        self, type: type[Any], *, default: Any = MISSING, restart: bool = False, doc: str = ""
    ) -> None:
        where = f"osless.Field({_type_repr(type)}, ...)"
        if type not in _TYPE_NAMES:
            raise UsageError(f"{where}: unsupported type; {_TYPES_HINT}")
        if not isinstance(restart, bool):
            raise UsageError(f"{where}: restart= takes True or False, got {restart!r}")
        if not isinstance(doc, str):
            raise UsageError(f"{where}: doc= takes a string, got {doc!r}")
        if default is not MISSING:
            if type is Secret:
                raise UsageError(
                    f"{where}: a secret cannot have a default (it would sit in the code and the image); "
                    "set it with `osless config set APP KEY=...`"
                )
            problem = _misfit(type, default)
            if problem is not None:
                raise UsageError(f"{where}: the default {problem}")
            # A copy, so that later changes to the caller's dict or list do not change the default.
            default = float(default) if type is float else copy.deepcopy(default)
        self.type = type
        self.default = default
        self.restart = restart
        self.doc = doc

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": _TYPE_NAMES[self.type]}
        if not self.required:
            out["default"] = self.default
        out["required"] = self.required
        out["restart"] = self.restart
        if self.doc:
            out["doc"] = self.doc
        return out

    def __repr__(self) -> str:
        default = "" if self.required else f", default={self.default!r}"
        return f"Field({_type_repr(self.type)}{default}, restart={self.restart})"


class Settings:
    """The app's config, read as attributes: `settings.greeting` is the current value on every read."""

    # Instance attributes are underscored so that they never shadow a key (keys start with a letter).
    __slots__ = ("__weakref__", "_app", "_fields")

    def __init__(self, app: str, fields: Mapping[str, Field]) -> None:
        object.__setattr__(self, "_app", app)
        object.__setattr__(self, "_fields", dict(sorted(fields.items())))
        _registry.add(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy and pickle probe for dunders before our slots are set
            raise AttributeError(name)
        field = self._fields.get(name)
        if field is None:
            keys = ", ".join(self._fields) or "none"
            raise AttributeError(f"app {self._app!r} declares no config key {name!r} (keys: {keys})")
        return self._read(name, field, _state.values)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"config is read-only in the app: run osless config set {self._app} {name}=...")

    def as_dict(self) -> dict[str, Any]:
        """Every key that has a value (set, or its default), secrets included."""
        values = _state.values
        out: dict[str, Any] = {}
        for name, field in self._fields.items():
            value = _effective(field, values.get(name, MISSING))
            if value is not MISSING:
                out[name] = value
        return out

    def manifest(self) -> dict[str, Any]:
        return {name: field.manifest() for name, field in self._fields.items()}

    def __repr__(self) -> str:
        values = _state.values
        parts = []
        for name, field in self._fields.items():
            value = _effective(field, values.get(name, MISSING))
            if value is MISSING:
                shown = "<not set>"
            elif field.type is Secret:
                shown = _MASK
            else:
                shown = repr(value)
            parts.append(f"{name}={shown}")
        return f"Settings({', '.join(parts)})"

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self._fields})

    def _read(self, name: str, field: Field, values: Mapping[str, Any]) -> Any:
        raw = values.get(name, MISSING)
        if raw is MISSING:
            if field.required:
                raise ConfigError(f"{name} is not set: run osless config set {self._app} {name}=...")
            return field.default
        problem = _misfit(field.type, raw)
        if problem is not None:
            # The stored value predates this schema; say so rather than hand the app a wrong type.
            raise ConfigError(f"{name} {problem}: run osless config set {self._app} {name}=...")
        return float(raw) if field.type is float else raw


class _State:
    """The values the platform pushed last, replaced whole (never mutated) so readers need no lock."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.version = 0


_state = _State()
# What a one-off command (`osless run`, a release step) gets instead of pushes: the values the
# instances have when it starts, as JSON `{"values", "version"}` in its environment.
CONFIG_ENV = "OSLESS_CONFIG"
# Every live schema in the process (one in an instance; tests make many): apply() reports changes by them.
_registry: weakref.WeakSet[Settings] = weakref.WeakSet()


def apply(values: Mapping[str, Any], version: int) -> dict[str, Any]:
    """Replace the current values; return the keys whose value changed, mapped to their new value.

    `values` are every current value (secrets in plain text), already checked against the schema by the
    API. Keys no declared schema knows are kept (a schema may be declared later, at import) but not
    reported. A key that became unset reports its default, or None when it has none.
    """
    old = _state.values
    new = dict(values)
    changed: dict[str, Any] = {}
    for settings in list(_registry):
        for name, field in settings._fields.items():
            before = _effective(field, old.get(name, MISSING))
            after = _effective(field, new.get(name, MISSING))
            if not _same(before, after):
                changed[name] = None if after is MISSING else after
    # Values first: a reader that sees the new version also sees the new values.
    _state.values = new
    _state.version = version
    return changed


def _from_env() -> None:
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        return
    try:
        got = json.loads(raw)
        values, version = got["values"], got["version"]
    except (ValueError, KeyError, TypeError):
        return  # not the platform's: the app's own settings are then unset, and say so when read
    if isinstance(values, dict) and isinstance(version, int):
        _state.values, _state.version = dict(values), version


def current_version() -> int:
    """The version of the values last applied; 0 before any."""
    return _state.version


def check_fields(app: str, fields: Mapping[str, object]) -> dict[str, Field]:
    """`app.config(**fields)`'s arguments, checked and each made a Field."""
    if not fields:
        raise UsageError(
            f"app {app!r}: app.config() needs at least one key, such as app.config(greeting=str)"
        )
    out: dict[str, Field] = {}
    for name, spec in fields.items():
        if not KEY_RE.fullmatch(name) or keyword.iskeyword(name) or name in _RESERVED:
            raise UsageError(
                f"config key {name!r}: use a lowercase Python identifier of up to 64 characters "
                "(letters, digits, '_'; starting with a letter), other than 'as_dict'"
            )
        if isinstance(spec, Field):
            out[name] = spec
        elif isinstance(spec, type) and spec in _TYPE_NAMES:
            out[name] = Field(spec)
        else:
            hint = " (for dicts and lists use osless.JSON)" if spec in (dict, list) else ""
            raise UsageError(f"config key {name!r}: unsupported type {_type_repr(spec)}{hint}; {_TYPES_HINT}")
    return out


def _effective(field: Field, raw: Any) -> Any:
    """What a read returns, or MISSING when it would raise; never raises itself."""
    if raw is MISSING:
        return field.default
    if field.type is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    return raw


def _same(a: Any, b: Any) -> bool:
    # 1 == True == 1.0 in Python, but a change from 1 to true is a change to the app.
    return type(a) is type(b) and a == b


def _misfit(kind: type[Any], value: Any) -> str | None:
    """Why `value` does not fit `kind`, or None when it does."""
    if kind is JSON:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            return f"must be a JSON value (dict, list, str, int, float, bool or None): {e}"
        return None
    if kind is Secret:
        kind = str
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return "must be a finite float (JSON has no NaN or infinity)"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    article = "an" if kind is int else "a"
    return f"must be {article} {kind.__name__}, got {type(value).__name__}"


def _type_repr(kind: object) -> str:
    if kind in (JSON, Secret):
        return f"osless.{kind.__name__}"
    return getattr(kind, "__name__", None) or repr(kind)


def read_schema(raw: object) -> dict[str, dict[str, Any]]:
    """A config schema as a manifest holds it (`Settings.manifest()`), checked again: at build time
    the app's own process printed it."""
    if not isinstance(raw, Mapping):
        raise UsageError("the config schema is not a mapping")
    names = set(_TYPE_NAMES.values())
    out: dict[str, dict[str, Any]] = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not KEY_RE.fullmatch(name) or name in _RESERVED:
            raise UsageError(f"config key {str(name)[:50]!r} is not a valid key name")
        if not isinstance(spec, Mapping) or not {"type", "required", "restart"} <= set(spec):
            raise UsageError(f"config key {name!r} needs a type, required and restart")
        if set(spec) - {"type", "required", "restart", "default", "doc"}:
            raise UsageError(f"config key {name!r} has fields the platform does not know")
        if spec["type"] not in names or not isinstance(spec["required"], bool):
            raise UsageError(f"config key {name!r}: type must be one of {sorted(names)}, required a bool")
        if not isinstance(spec["restart"], bool) or ("default" in spec) == spec["required"]:
            raise UsageError(f"config key {name!r}: a default exactly when it is not required")
        if "doc" in spec and (not isinstance(spec["doc"], str) or len(spec["doc"]) > 2000):
            raise UsageError(f"config key {name!r}: doc must be text of at most 2000 characters")
        out[name] = dict(spec)
    return out


_from_env()
