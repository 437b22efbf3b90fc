"""Find and import an app's entry module, and tell what kind of web app its factory returns."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import tomllib
from typing import Any, Literal

from osless.sdk import App, UsageError

__all__ = ["find_entry", "load_app", "web_kind"]

# A dotted module path; anything else cannot be imported and is a typo in pyproject.toml.
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def find_entry(code_dir: str) -> str:
    """The module to import: `[tool.osless] entry`, else `app` (app.py), else `main` (main.py)."""
    pyproject = os.path.join(code_dir, "pyproject.toml")
    if os.path.isfile(pyproject):
        try:
            with open(pyproject, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"{pyproject} is not valid TOML: {e}") from e
        tool = data.get("tool")
        osless = tool.get("osless") if isinstance(tool, dict) else None
        entry = osless.get("entry") if isinstance(osless, dict) else None
        if entry is not None:
            _check_entry(entry, f"[tool.osless] entry in {pyproject}")
            return str(entry)
    for name in ("app", "main"):
        if os.path.isfile(os.path.join(code_dir, f"{name}.py")):
            return name
    raise UsageError(
        f"no entry module in {code_dir}: add app.py (or main.py) defining `app = osless.App(...)`, "
        'or set [tool.osless] entry = "module" in pyproject.toml'
    )


def load_app(code_dir: str, deps_dir: str | None, entry: str) -> App:
    """Import `entry` with the code layer (then the dependency layer) first on sys.path; return its App."""
    _check_entry(entry, "the entry")
    # Inserted in reverse so the result is [code_dir, deps_dir, ...]: app code shadows its deps,
    # and both shadow whatever the runtime's own environment has.
    for path in (deps_dir, code_dir):
        if path is not None:
            abspath = os.path.abspath(path)
            if abspath in sys.path:
                sys.path.remove(abspath)
            sys.path.insert(0, abspath)
    try:
        module = importlib.import_module(entry)
    except ModuleNotFoundError as e:
        # Only our own import of the entry is rephrased; a missing dependency keeps its traceback.
        if e.name is not None and (entry == e.name or entry.startswith(e.name + ".")):
            raise UsageError(f"entry module {entry!r} not found in {code_dir}") from e
        raise
    apps: dict[int, tuple[str, App]] = {}
    for name, value in vars(module).items():
        if isinstance(value, App):
            apps.setdefault(id(value), (name, value))  # one App bound to two names is still one App
    where = f"module {entry!r} ({getattr(module, '__file__', None) or code_dir})"
    if not apps:
        raise UsageError(f'{where} defines no osless.App: add `app = osless.App("name")` at module level')
    if len(apps) > 1:
        names = ", ".join(sorted(name for name, _ in apps.values()))
        raise UsageError(
            f"{where} defines {len(apps)} osless.App instances ({names}); an entry module has exactly one"
        )
    return next(iter(apps.values()))[1]


def _check_entry(entry: object, where: str) -> None:
    if isinstance(entry, str) and entry.endswith(".py"):
        # "app.py" would parse as module py of package app: almost surely a file name by mistake.
        raise UsageError(
            f"{where} must be a module name, not a file name: write {entry[:-3]!r}, not {entry!r}"
        )
    if not isinstance(entry, str) or not _MODULE_RE.match(entry):
        raise UsageError(f'{where} must be a module name like "app" or "shop.main", got {entry!r}')


def web_kind(obj: Any) -> Literal["asgi", "wsgi"]:
    """ASGI if `obj` (or its `__call__`) is a coroutine function, WSGI if callable with 2 positional args."""
    if inspect.isclass(obj):
        # A common slip: `return Flask` instead of `return Flask(__name__)`; its __init__ would pass below.
        raise UsageError(
            f"@app.web() factory must return an ASGI or WSGI app, got the class {obj.__qualname__}; "
            "return an instance of it"
        )
    # The type's __call__, not the instance's: that is the one Python calls.
    if inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
        inspect.getattr_static(type(obj), "__call__", None)
    ):
        return "asgi"
    if callable(obj):
        try:
            inspect.signature(obj).bind(None, None)
        except (TypeError, ValueError):
            pass
        else:
            return "wsgi"
    shown = repr(obj)
    if len(shown) > 100:
        shown = shown[:97] + "..."
    raise UsageError(f"@app.web() factory must return an ASGI or WSGI app, got {shown}")
