"""A child process that a platform process starts beside itself and keeps up (the builder, nats-server).

It dies with its parent (PR_SET_PDEATHSIG). When it dies it is started again, with a backoff that
grows while it keeps dying at once and starts over once it has run for a while. `stop` sends SIGTERM,
then SIGKILL after the child's grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time

__all__ = ["BACKOFF_S", "STEADY_S", "KeptChild"]

log = logging.getLogger("osless")

BACKOFF_S = (0.5, 10.0)
STEADY_S = 10.0  # up this long: its next death starts the backoff over


class KeptChild:
    """Subclasses say what the child is (`what`, `stop_grace_s`) and how it starts (`spawn`)."""

    what = "a child process"
    stop_grace_s = 10.0

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def spawn(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    async def run(self) -> None:
        """Keep it up until `stop` (started here unless it already runs)."""
        delay = BACKOFF_S[0]
        while not self._stopping:
            if self.proc is None:
                self.proc = self.spawn()
            started = time.monotonic()
            code = await asyncio.to_thread(self.proc.wait)
            if self._stopping:
                return
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            log.error("%s (pid %d) %s; starting it again", self.what, self.proc.pid, how)
            if time.monotonic() - started >= STEADY_S:
                delay = BACKOFF_S[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])
            self.proc = None

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL after the grace period."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), self.stop_grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
