"""node.spawn without a zygote: reading an instance's pipes, and a fork that cannot get its pipes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from osless.node.spawn import forward_lines


def test_a_pipe_s_reader_says_when_it_has_read_all_there_was() -> None:
    """What an instance wrote last is read before its log closes: the supervisor waits on this."""

    async def read() -> tuple[list[str], bool, bool]:
        r, w = os.pipe()
        lines: list[str] = []
        ended = forward_lines(r, lines.append)
        os.write(w, b"one\ntwo\nthe last, with no newline")
        await asyncio.sleep(0.05)
        before = ended.done()
        os.close(w)
        await asyncio.wait_for(ended, 5)
        return lines, before, ended.done()

    assert asyncio.run(read()) == (["one", "two", "the last, with no newline"], False, True)


def test_a_pipe_s_reader_ends_at_eof_whatever_its_last_line_does() -> None:
    """The last line (no newline) comes at EOF: if writing it fails (its log closed meanwhile), the
    reader is still removed and the pipe closed, not called again at once, forever."""

    async def read() -> tuple[int, bool]:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: None)  # the error is the loop's to log
        r, w = os.pipe()
        calls = 0

        def emit(line: str) -> None:
            nonlocal calls
            calls += 1
            raise ValueError("write to closed file")

        forward_lines(r, emit)
        os.write(w, b"no newline at the end")
        os.close(w)
        await asyncio.sleep(0.2)
        try:
            os.fstat(r)
        except OSError:
            return calls, True
        return calls, False

    assert asyncio.run(read()) == (1, True)


_OUT_OF_FDS = """
import asyncio, os, resource, socket, tempfile
from pathlib import Path
from osless.logs import LogWriter
from osless.node.spawn import Zygote, _Channel

def used() -> list[int]:  # without opening one, as listing /proc/self/fd would
    out = []
    for fd in range(4096):
        try:
            os.fstat(fd)
        except OSError:
            continue
        out.append(fd)
    return out

async def main() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    log = LogWriter(Path(tempfile.mkdtemp()) / "i-1.log", source="i-1")
    root = Path("/")
    zygote = Zygote(image="x", app="a", uid=0, code_dir=root, deps_dir=root, entry="app:app", log=log)
    zygote._channel = _Channel(ours, lambda msg, pid: None, lambda: None)
    before = used()
    free = [fd for fd in range(4096) if fd not in before]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[4], hard))  # room for two of its pipes
    try:
        await zygote.fork("i-1", (ours, theirs), {}, log, [])
    except OSError:
        pass
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(sorted(set(used()) - set(before)))

asyncio.run(main())
"""


def test_a_fork_out_of_descriptors_leaks_none() -> None:
    """Out of descriptors, the node's fork fails with the pipes it made closed: a node at its limit
    would otherwise lose a few more at each instance it tries to start."""
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_FDS], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "[]", done.stderr
