"""A real `osless up` in a subprocess, and the real CLI against it: what the end-to-end tests drive."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from osless.builder import pack
from tests.etcd import EtcdCluster

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
OSLESS = str(Path(sys.executable).parent / "osless")


def recv_until(sock: socket.socket, done: Callable[[bytes], bool]) -> bytes:
    """What `sock` sends until `done` says it is all there; the peer closing first fails the test."""
    data = b""
    while not done(data):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


class AuthRecorder:
    """A peer the platform calls (a node API, a gateway) that a hostile node named: it notes every
    Authorization header it is shown and answers 200 with `body` (of `content_type`)."""

    def __init__(self, body: bytes = b"", content_type: str = "application/x-ndjson") -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.shown: list[str] = []
        self._answer = (
            f"HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode() + body
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                head = recv_until(conn, lambda b: b"\r\n\r\n" in b).decode("latin-1")
                self.shown += [
                    line.split(":", 1)[1].strip()
                    for line in head.split("\r\n")
                    if line.lower().startswith("authorization:")
                ]
                conn.sendall(self._answer)

    def close(self) -> None:
        self.server.close()


def running(pid: int) -> bool:
    """Whether `pid` exists and has not ended (a zombie has: only its exit status waits for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, it was read
        return False
    return state not in ("Z", "X")


def ns_pids(pid: int) -> list[int]:
    """A process's pid in each pid namespace it belongs to, the host's first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Platform:
    data_dir: Path
    api_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""
    args: list[str] = field(default_factory=list)  # more `osless up` options
    up_env: dict[str, str] = field(default_factory=dict)  # more environment for `osless up`
    osless: str = OSLESS  # the program run for `osless up` and the CLI (another release's, to upgrade from)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "OSLESS_API": self.api,
            "OSLESS_TOKEN": self.token,
            "OSLESS_CONFIG_DIR": str(self.data_dir / "cli-config"),
            "COLUMNS": "200",
        }

    def start(self, timeout: float = 30.0) -> Platform:
        log = open(self.data_dir.parent / "up.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                self.osless,
                "up",
                "--data-dir",
                str(self.data_dir),
                "--api-port",
                str(self.api_port),
                "--http-port",
                str(self.http_port),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OSLESS_CONFIG_DIR": str(self.data_dir / "cli-config"), **self.up_env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"osless up exited with {self.proc.returncode}: {self.output()[-2000:]}")
            token_file = self.data_dir / "admin-token"
            if token_file.exists():
                self.token = token_file.read_text().strip()
                try:
                    if (
                        httpx.get(f"{self.gateway}/_health", timeout=1).status_code == 200
                        and self.http("GET", "/v1/status").status_code == 200
                    ):
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        # Stopped here: the caller never gets the platform to stop (a run's `osless up` outlived it).
        self.stop()
        raise RuntimeError(f"osless up did not come up in {timeout}s: {self.output()[-2000:]}")

    def output(self) -> str:
        p = self.data_dir.parent / "up.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def http(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return httpx.request(method, self.api + path, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def cli(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [self.osless, *args], env=self.env, capture_output=True, text=True, input=input, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(f"osless {' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def deploy(self, path: Path, *extra: str) -> dict[str, Any]:
        result: dict[str, Any] = self.cli_json("deploy", str(path), *extra)
        return result

    def upload(self, path: Path, app: str | None = None) -> dict[str, Any]:
        """Start a deploy of `path` through the API and return at once, while it builds."""
        r = self.http(
            "POST",
            "/v1/deploys",
            params={"app": app} if app else None,
            content=pack(path),
            headers={"content-type": "application/gzip"},
        )
        assert r.status_code == 202, r.text
        deploy: dict[str, Any] = r.json()
        return deploy

    def wait_for_build_line(self, deploy_id: str, text: str, timeout: float = 60) -> None:
        """Follow a deploy's build log until a line holds `text`; fail if the build ends first."""
        with httpx.stream(
            "GET",
            f"{self.api}/v1/deploys/{deploy_id}/log",
            params={"follow": "true"},
            headers={"authorization": f"Bearer {self.token}"},
            timeout=timeout,
        ) as r:
            for line in r.iter_lines():
                record = json.loads(line)
                assert "deploy" not in record, f"the build ended before {text!r}: {record}"
                if text in record.get("line", ""):
                    return
        raise AssertionError(f"the log of {deploy_id} ended before {text!r}")

    def deploy_warm(self, path: Path, *extra: str) -> dict[str, Any]:
        """Deploy, and keep one instance up whatever the traffic: for fixtures outliving the idle window."""
        result = self.deploy(path, *extra)
        self.cli("scale", str(result["app"]), "--min", "1")
        return result

    def wait_for(self, predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")

    def invoke(self, app: str, function: str, event: Any = None, timeout: float = 60) -> tuple[int, Any]:
        """(status, JSON body) of a function call through the API."""
        r = self.http("POST", f"/v1/apps/{app}/functions/{function}:invoke", json=event, timeout=timeout)
        return r.status_code, r.json()

    def instances(self, app: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.http("GET", "/v1/instances", params={"app": app}).json()["items"]
        return items


@dataclass
class Server(Platform):
    """`osless server --etcd URL`: the API and the controllers on etcd, no node of its own (nodes join
    with `Node`). Driven like a `Platform`: the CLI and `http` reach its API."""

    etcd: str = ""  # etcd://HOST:PORT/ROOT

    def start(self, timeout: float = 30.0) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / "up.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                self.osless,
                "server",
                "--etcd",
                self.etcd,
                "--data-dir",
                str(self.data_dir),
                "--api-port",
                str(self.api_port),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OSLESS_CONFIG_DIR": str(self.data_dir / "cli-config"), **self.up_env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"osless server exited with {self.proc.returncode}: {self.output()[-2000:]}"
                )
            token_file = self.data_dir / "admin-token"
            if token_file.exists():
                self.token = token_file.read_text().strip()
                with contextlib.suppress(httpx.HTTPError):
                    if self.http("GET", "/v1/status", timeout=1).status_code == 200:
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"osless server did not come up in {timeout}s: {self.output()[-2000:]}")


def copy_app(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@dataclass
class Node:
    """A second machine's node on this one: `osless node join` against a running `Platform`, with a
    node token made through the API, a data dir and a gateway port of its own."""

    platform: Platform
    name: str
    data_dir: Path
    http_port: int = field(default_factory=free_port)
    args: list[str] = field(default_factory=list)  # more `osless node join` options
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"  # its gateway's address (any of 127/8: each node may have its own)
    token: str = ""  # its node token, once started

    @property
    def gateway(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def start(self, timeout: float = 30.0) -> Node:
        made = self.platform.cli_json("tokens", "create", "--role", "node", "--name", f"node:{self.name}")
        self.token = made["token"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir.parent / f"node-{self.name}.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                self.platform.osless,
                "node",
                "join",
                "--api",
                self.platform.api,
                "--name",
                self.name,
                "--data-dir",
                str(self.data_dir),
                "--host",
                self.host,
                "--http-port",
                str(self.http_port),
                "--gateways",
                "1",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OSLESS_NODE_TOKEN": self.token},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"node {self.name} exited with {self.proc.returncode}: {self.output()[-2000:]}"
                )
            nodes = self.platform.http("GET", "/v1/nodes").json()["items"]
            if any(n["name"] == self.name for n in nodes):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{self.gateway}/_health", timeout=1).status_code == 200:
                        return self
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name} did not join in {timeout}s: {self.output()[-2000:]}")

    def output(self) -> str:
        p = self.data_dir.parent / f"node-{self.name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        self.proc.send_signal(sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Cluster:
    """A fleet on this machine: etcd (one member or three), an `osless server` on it, and `size` nodes,
    node k on 127.0.0.(k+1) with one gateway port for all. Driven through `server` (a `Platform`);
    each node, etcd member and the server can be stopped or killed on its own."""

    root: Path
    size: int = 3
    etcd_members: int = 1
    http_port: int = field(default_factory=free_port)
    etcd: EtcdCluster = field(init=False)
    server: Server = field(init=False)
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.etcd = EtcdCluster(self.root / "etcd", size=self.etcd_members)
        self.server = Server(self.root / "server" / "data")

    def start(self) -> Cluster:
        try:
            self.etcd.start()
            self.server.etcd = self.etcd.url()
            self.server.start()
            for k in range(1, self.size + 1):
                self.add_node(f"n{k}", f"127.0.0.{k + 1}")
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, name: str, host: str) -> Node:
        node_dir = self.root / name / "data"
        node_dir.mkdir(parents=True, exist_ok=True)
        node = Node(self.server, name, node_dir, http_port=self.http_port, host=host)
        self.nodes.append(node)
        return node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.server.stop()
        self.etcd.stop()
