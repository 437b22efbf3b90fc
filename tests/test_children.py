"""A kept child (the builder, nats-server) is started again when it dies, and stopped for good by `stop`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from osless.pdeathsig import die_with_parent
from osless.server.children import KeptChild


class Sleeper(KeptChild):
    what = "a sleeper"
    stop_grace_s = 2.0

    def __init__(self) -> None:
        super().__init__()
        self.started: list[int] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        parent = os.getpid()
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=lambda: die_with_parent(parent)
        )
        self.started.append(proc.pid)
        return proc


async def _until(predicate: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_kept_child_that_dies_is_started_again_and_stop_ends_it() -> None:
    async def scenario() -> None:
        child = Sleeper()
        keeper = asyncio.create_task(child.run())
        await _until(lambda: len(child.started) == 1)
        first = child.started[0]
        os.kill(first, signal.SIGKILL)
        await _until(lambda: len(child.started) == 2 and child.proc is not None)
        assert child.started[1] != first
        await child.stop()
        await asyncio.wait_for(keeper, 5)
        assert child.proc is not None and child.proc.poll() is not None
        assert len(child.started) == 2  # nothing started after the stop

    asyncio.run(scenario())
