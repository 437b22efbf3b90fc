"""Run one command inside a sandbox: `python -m osless.runtime.jail SPEC_JSON [--nproc N] -- CMD...`.

The builder runs every step that may run an app's code through this (resolving and installing its
dependencies, whose setup.py runs then, and importing the app), as the app's own uid: no app code
runs outside a sandbox, not even at build time. Must be started as root (it writes the sandbox's id
maps); exits with the command's status.

`--nproc N` caps the processes and threads of the sandbox (RLIMIT_NPROC): the sandbox's user
namespace is its own, so the count is this sandbox's alone, and a fork bomb in a setup.py stalls
at N instead of taking the host's process table.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import NoReturn

from osless.runtime import sandbox

__all__ = ["main"]

_USAGE = "usage: python -m osless.runtime.jail SPEC_JSON [--nproc N] -- CMD [ARGS...]"


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    nproc: int | None = None
    if len(args) >= 3 and args[1] == "--nproc" and args[2].isdigit():
        nproc = int(args[2])
        args = [args[0], *args[3:]]
    if len(args) < 3 or args[1] != "--":
        print(_USAGE, file=sys.stderr)
        raise SystemExit(2)
    spec = sandbox.SandboxSpec.from_json(json.loads(args[0]))
    command = args[2:]

    def run() -> NoReturn:
        # In the sandbox, every capability gone: lowering a limit needs none.
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        # What the command writes (the app's uv cache, a layer before the image store seals it) is
        # its own alone, like everything else in the data dir.
        os.umask(0o077)
        os.execv(command[0], command)

    keeper = sandbox.spawn(spec, run)
    _, status = os.waitpid(keeper, 0)
    code = os.waitstatus_to_exitcode(status)
    raise SystemExit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
