"""Run one command inside a sandbox: `python -m osless.runtime.jail SPEC_JSON [--nproc N] -- CMD...`.

The builder runs every step that may run an app's code through this (resolving and installing its
dependencies, whose setup.py runs then, and importing the app), as the app's own uid: no app code
runs outside a sandbox, not even at build time. Must be started as root (it writes the sandbox's id
maps); exits with the command's status.

`--nproc N` caps the processes and threads of the sandbox (RLIMIT_NPROC): the sandbox's user
namespace is its own, so the count is this sandbox's alone, and a fork bomb in a setup.py stalls
at N instead of taking the host's process table.

`OSLESS_JAIL_EXEC` (JSON `{"env", "cwd", "cgroup_fds", "tty"}`, in this process's environment, which only
root can read): how `osless run` and release steps start an app's command (`node.runs`). The jail
joins the cgroups whose join files it was passed (before anything forks, so the whole sandbox is
in them), and the command gets exactly `env` (its PATH searched), in `cwd`; with `tty`, its stdin
(a terminal) becomes its controlling terminal. Never PYTHONPATH for
the jail itself: it runs as root, and the app's code must not be what it imports.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import sys
import termios
from typing import NoReturn

from osless.runtime import sandbox

__all__ = ["EXEC_ENV", "main"]

EXEC_ENV = "OSLESS_JAIL_EXEC"
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
    how = json.loads(os.environ.pop(EXEC_ENV, "null")) or {}
    for fd in how.get("cgroup_fds") or ():
        os.write(int(fd), b"0")
        os.close(int(fd))
    env: dict[str, str] | None = how.get("env")
    cwd: str | None = how.get("cwd")
    tty = bool(how.get("tty"))

    def run() -> NoReturn:
        # In the sandbox, every capability gone: lowering a limit needs none.
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        # What the command writes (the app's uv cache, a layer before the image store seals it) is
        # its own alone, like everything else in the data dir.
        os.umask(0o077)
        if env is None:
            os.execv(command[0], command)
        if cwd:
            os.chdir(cwd)
        if tty:  # stdin is a terminal: made this session's, so Ctrl-C there interrupts the command
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        try:
            os.execvpe(command[0], command, env)
        except OSError as e:  # said as a shell would, with its code: not found 127, not runnable 126
            print(f"osless: {command[0]}: {e.strerror}", file=sys.stderr, flush=True)
            os._exit(127 if isinstance(e, FileNotFoundError) else 126)

    keeper = sandbox.spawn(spec, run)
    _, status = os.waitpid(keeper, 0)
    code = os.waitstatus_to_exitcode(status)
    raise SystemExit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
