"""The app's name, read from its entry module without importing it.

A build runs as the app's own uid, so the name must be known before any of the app's code runs:
`App("shop")` or `osless.App(name="shop")` with a literal name in the entry module. After the
import, the builder checks that the app's real name is the one it built as.
"""

from __future__ import annotations

import ast
from pathlib import Path

from osless.builder.process import BuildError
from osless.sdk.app import NAME_RE

__all__ = ["MAX_ENTRY_BYTES", "read_app_name"]

MAX_ENTRY_BYTES = 2 * 1024 * 1024
_HOW = 'pass --name NAME to osless deploy, or write App("name") with a literal name in the entry module'


def read_app_name(code: Path, entry: str) -> str:
    """The one literal name given to `App(...)` in module `entry` of `code`; else BuildError."""
    base = code.joinpath(*entry.split("."))
    path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
    if path is None:
        raise BuildError(f"The entry module {entry!r} is not in the uploaded source; {_HOW}.")
    shown = str(path.relative_to(code))[:200]
    with path.open("rb") as f:
        source = f.read(MAX_ENTRY_BYTES + 1)
    if len(source) > MAX_ENTRY_BYTES:
        raise BuildError(f"{shown} is larger than {MAX_ENTRY_BYTES // 1024 // 1024} MB; {_HOW}.")
    try:
        tree = ast.parse(source, filename=str(shown))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        where = f" line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
        raise BuildError(
            f"{shown}{where}: SyntaxError: {getattr(e, 'msg', e)}. Fix it and deploy again."
        ) from e
    names: set[str] = set()
    unreadable = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _is_app(node.func):
            value = (
                node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
            )
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                names.add(value.value)
            else:
                unreadable += 1
    if not names or unreadable:
        raise BuildError(
            f"Could not read the app's name from {shown} (it must be known before the build runs); {_HOW}."
        )
    if len(names) > 1:
        listed = ", ".join(repr(n[:50]) for n in sorted(names)[:5])
        raise BuildError(f"{shown} names several apps ({listed}); {_HOW}.")
    name = names.pop()
    if not NAME_RE.fullmatch(name):
        raise BuildError(
            f"invalid app name {name[:50]!r} in {shown}: use 1-40 lowercase letters, digits and '-', "
            'starting with a letter (for example App("shop")).'
        )
    return name


def _is_app(func: ast.expr) -> bool:
    """`App(...)` or `osless.App(...)`."""
    if isinstance(func, ast.Name):
        return func.id == "App"
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "App"
        and isinstance(func.value, ast.Name)
        and func.value.id == "osless"
    )
