"""The builder process that `osless up` and `osless server` start beside the API, kept up.

A child process (`python -m osless.builder`), as the gateway processes are: the API's process never
builds, nor imports the builder. It gets a builder token of its own through its environment (none of
the platform's other `OSLESS_*` settings: the admin's token or the secrets' key may be among them),
its data in `<data dir>/builder`, and dies with its parent (PR_SET_PDEATHSIG). When it dies it is
started again, with backoff; what it was building is failed once its lease lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BuilderChild"]

log = logging.getLogger("osless")

PR_SET_PDEATHSIG = 1
STOP_GRACE_S = 20.0  # its builds are stopped and their deploys failed, saying so, before it exits
BACKOFF_S = (0.5, 10.0)
STEADY_S = 10.0


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: SIGTERM when the parent dies (and at once if it already has)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


class BuilderChild:
    def __init__(self, *, api_url: str, token: str, data_dir: Path, sandbox: bool) -> None:
        self.api_url = api_url
        self.token = token
        self.data_dir = data_dir
        self.sandbox = sandbox
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = False

    def _start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSLESS_")}
        env["OSLESS_BUILDER_TOKEN"] = self.token
        args = [
            sys.executable,
            "-m",
            "osless.builder",
            "--api",
            self.api_url,
            "--data-dir",
            str(self.data_dir),
        ]
        if not self.sandbox:
            args.append("--no-sandbox")
        parent = os.getpid()
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, env=env, preexec_fn=lambda: _die_with_parent(parent)
        )

    async def run(self) -> None:
        """Keep the builder process up until `stop`."""
        delay = BACKOFF_S[0]
        while not self._stopping:
            started = time.monotonic()
            self.proc = self._start()
            code = await asyncio.to_thread(self.proc.wait)
            if self._stopping:
                return
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            log.error("the builder process (pid %d) %s; starting it again", self.proc.pid, how)
            if time.monotonic() - started >= STEADY_S:
                delay = BACKOFF_S[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    async def stop(self) -> None:
        """SIGTERM (its builds fail, saying so), SIGKILL after the grace period."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
