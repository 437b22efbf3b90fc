"""A real `osless up` for a benchmark: temp data dir, free ports, the CLI pointed at it, cleaned up."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent

__all__ = ["RunningPlatform", "free_port", "running_platform"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningPlatform:
    work: Path
    api_port: int
    http_port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    @property
    def data_dir(self) -> Path:
        return self.work / "data"

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def osless(self, *args: str) -> None:
        """Run the CLI against this platform; output discarded, failure raises."""
        subprocess.run([str(BIN / "osless"), *args], env=self.env, check=True, stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def running_platform(prefix: str, *args: str) -> Iterator[RunningPlatform]:
    """`osless up` with `args` added (e.g. "--gateways", "1")."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    env = {**os.environ, "OSLESS_CONFIG_DIR": str(work / "cfg")}
    api_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "osless"),
            "up",
            "--data-dir",
            str(work / "data"),
            "--api-port",
            str(api_port),
            "--http-port",
            str(http_port),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (work / "cfg" / "credentials.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("osless up did not start")
            time.sleep(0.05)
        yield RunningPlatform(work, api_port, http_port, env, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
