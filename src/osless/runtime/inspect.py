"""Print an app's manifest as one JSON line: `python -m osless.runtime.inspect --code DIR [--deps DIR]`.

The builder runs this in a separate process at build time, with the code and dependency layers on
the path, so a broken app fails its deploy instead of its instances.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

from osless.runtime.loader import find_entry, load_app, web_kind

__all__ = ["inspect_app", "main"]


def inspect_app(code_dir: str, deps_dir: str | None = None, entry: str | None = None) -> dict[str, Any]:
    """Import the app, call its web factory once, and return `{"entry", "app"}` (the manifest)."""
    entry = entry or find_entry(code_dir)
    app = load_app(code_dir, deps_dir, entry)
    manifest = app.manifest()
    if app.web_spec is not None:
        # Called here so a factory that fails or returns the wrong thing fails the build, not the instance.
        manifest["web"]["kind"] = web_kind(app.web_spec.factory())
    return {"entry": entry, "app": manifest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osless.runtime.inspect", description=__doc__)
    parser.add_argument("--code", required=True, help="the code layer (the app's source)")
    parser.add_argument("--deps", help="the dependency layer")
    parser.add_argument("--entry", help="module defining the App (default: from pyproject.toml, app, main)")
    args = parser.parse_args(argv)
    # Stdout carries exactly one JSON line: whatever the app prints while importing (even from C code)
    # goes to stderr instead.
    sys.stdout.flush()
    out = os.dup(1)
    os.dup2(2, 1)
    try:
        # What the root zygote imports before the app (`instance.preload`): the app imports at build
        # time what it will import at run time.
        from osless.runtime.instance import preload

        preload()
        result = inspect_app(args.code, args.deps, args.entry)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
    with os.fdopen(out, "w") as f:
        f.write(json.dumps(result, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
