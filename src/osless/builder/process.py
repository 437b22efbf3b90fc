"""One build step as a subprocess: its output streamed a line at a time, a timeout that kills its tree.

Every step runs in a session of its own, so a timeout or `stop_all_builds` kills the step and all it
started with one `killpg`. A sandboxed step is `python -m osless.runtime.jail`, whose sandbox dies
with it: the jail's keeper and the sandbox's pid 1 have PR_SET_PDEATHSIG, and when pid 1 of a pid
namespace dies the kernel kills everything else in it, even what left the process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["BuildError", "Log", "Run", "run", "stop_all_builds", "tail"]

Log = Callable[[str], None]
_TAIL_LINES = 6
# What a step prints is kept (and logged) within bounds: an app's import can print without end.
LINE_CHARS = 16384  # of one stderr line
STDOUT_CHARS = 4 * 1024 * 1024  # of stdout, kept whole for its caller (a lock, the manifest line)
STDERR_LINES = 200  # the last lines of stderr, kept for the error message


class BuildError(Exception):
    """A build failed; the message says what failed and how to fix it."""


@dataclass
class Run:
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr_lines: list[str] = field(default_factory=list)
    stdout_cut: bool = False  # stdout passed STDOUT_CHARS: `stdout` is its start only

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


# Every build subprocess, so that a stopping platform can end them (they have sessions of their own).
_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()


def stop_all_builds() -> None:
    """Kill every running build step (and its sandbox); their builds fail at once."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def run(
    cmd: Sequence[str],
    log: Log,
    *,
    timeout: float,
    cwd: Path,
    env: dict[str, str],
    stdin: str | None = None,
    stdout_prefix: str | None = "",
) -> Run:
    """Run `cmd`, logging each stderr line (and stdout line, if `stdout_prefix` is not None) as it comes."""
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,  # so a timeout kills the whole tree, not only the direct child
        )
    except OSError as e:
        raise BuildError(f"Could not run {cmd[0]!r}: {e}.") from e
    with _running_lock:
        _running.add(proc)
    try:
        return _collect(proc, log, timeout=timeout, stdin=stdin, stdout_prefix=stdout_prefix)
    finally:
        with _running_lock:
            _running.discard(proc)


def _collect(
    proc: subprocess.Popen[str], log: Log, *, timeout: float, stdin: str | None, stdout_prefix: str | None
) -> Run:
    out: list[str] = []
    err: deque[str] = deque(maxlen=STDERR_LINES)
    out_chars = 0
    out_cut = False

    def pump_out(stream: IO[str]) -> None:
        nonlocal out_chars, out_cut
        # Bounded reads: a line without end is taken in pieces, never whole.
        while line := stream.readline(STDOUT_CHARS):
            if stdout_prefix is not None:
                log(stdout_prefix + line.rstrip("\r\n"))
            if out_chars + len(line) > STDOUT_CHARS:
                out_cut = True
            if not out_cut:
                out.append(line)
                out_chars += len(line)

    def pump_err(stream: IO[str]) -> None:
        while line := stream.readline(LINE_CHARS):
            err.append(line)
            log(line.rstrip("\r\n"))

    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=pump_out, args=(proc.stdout,), daemon=True),
        threading.Thread(target=pump_err, args=(proc.stderr,), daemon=True),
    ]
    for t in readers:
        t.start()
    if stdin is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    returncode: int | None
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = None
    for t in readers:
        # Bounded: a grandchild that escaped the process group could hold the pipes open.
        t.join(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.close()
    return Run(returncode, "".join(out), [ln.rstrip("\r\n") for ln in err], out_cut)


def tail(lines: list[str]) -> str:
    """The last lines of a step's error output, indented, for a build error's message."""
    # importlib's own frames say nothing about the app's error; the full traceback is in the log anyway.
    kept = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith('File "<frozen importlib')]
    if not kept:
        return "    (no error output)"
    return "\n".join("    " + ln for ln in kept[-_TAIL_LINES:])
