"""A real `osless up` (or a whole cluster) for a benchmark: temp dir, free ports, the CLI pointed at it,
cleaned up. The platform is the tests' own (`tests/platform.py`): one way to start one, for both."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/platform.py: what the tests start, benchmarks alike

from tests.platform import Cluster, Platform, free_port  # noqa: E402

BIN = Path(sys.executable).parent

__all__ = [
    "BIN",
    "Cluster",
    "Platform",
    "RunningPlatform",
    "free_port",
    "running_cluster",
    "running_platform",
]


@dataclass
class RunningPlatform:
    """A started `Platform` in `work`, with what benchmarks read of it."""

    platform: Platform
    work: Path

    @property
    def data_dir(self) -> Path:
        return self.platform.data_dir

    @property
    def api_port(self) -> int:
        return self.platform.api_port

    @property
    def http_port(self) -> int:
        return self.platform.http_port

    @property
    def token(self) -> str:
        return self.platform.token

    @property
    def gateway(self) -> str:
        return self.platform.gateway

    @property
    def env(self) -> dict[str, str]:
        return self.platform.env

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.platform.proc is not None  # started
        return self.platform.proc

    def osless(self, *args: str) -> None:
        """Run the CLI against this platform; output discarded, failure raises."""
        self.platform.cli(*args, timeout=600)


@contextlib.contextmanager
def running_platform(prefix: str, *args: str, env: dict[str, str] | None = None) -> Iterator[RunningPlatform]:
    """`osless up` with `args` added (e.g. "--gateways", "1"), and `env` in its environment."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    platform = Platform(work / "data", args=list(args), up_env=dict(env or {}))
    try:
        platform.start(timeout=60)
        yield RunningPlatform(platform, work)
    finally:
        platform.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(prefix: str, nodes: int = 3, etcd_members: int = 1) -> Iterator[Cluster]:
    """etcd, an `osless server` and `nodes` nodes (node k on 127.0.0.(k+1)): for failover and the like."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = Cluster(work, size=nodes, etcd_members=etcd_members)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
