"""Run one command inside an app's sandbox: `python -m osless.runtime.jail SPEC_JSON -- CMD...`.

The builder imports an app through this, so that not even an app's import at build time runs
outside a sandbox. Must be started as root (it writes the sandbox's id maps); exits with the
command's status.
"""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

from osless.runtime import sandbox

__all__ = ["main"]


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m osless.runtime.jail SPEC_JSON -- CMD [ARGS...]", file=sys.stderr)
        raise SystemExit(2)
    spec = sandbox.SandboxSpec.from_json(json.loads(args[0]))
    command = args[2:]

    def run() -> NoReturn:
        os.execv(command[0], command)

    keeper = sandbox.spawn(spec, run)
    _, status = os.waitpid(keeper, 0)
    code = os.waitstatus_to_exitcode(status)
    raise SystemExit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
