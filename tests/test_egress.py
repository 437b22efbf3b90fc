"""Egress: an instance reaches only what its app declares, through the forwarder and the node's proxy.

Everything is real and local: the "outside host", the gateway and a TCP echo server are servers on
127.0.0.1, the proxy serves app `shop` on a unix socket, and the forwarder relays TCP to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import socketserver
import struct
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from osless.node.egress import EgressProxy, host_allowed
from osless.runtime.forwarder import start_forwarder_process

T = TypeVar("T")


class _Named(ThreadingHTTPServer):
    daemon_threads = True
    name = ""


class _Echo(BaseHTTPRequestHandler):
    """Answers with what it was asked: which server, the Host header, the path, and the body."""

    protocol_version = "HTTP/1.1"
    server: _Named

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode() if length else ""
        data = json.dumps(
            {
                "server": self.server.name,
                "method": self.command,
                "host": self.headers["Host"],
                "path": self.path,
                "connection": self.headers["Connection"],
                "proxy_connection": self.headers["Proxy-Connection"],
                "body": body,
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _EchoTCP(socketserver.BaseRequestHandler):
    """Sends back every byte, and ends its side when the client ends its own (half-close)."""

    request: socket.socket

    def handle(self) -> None:
        with self.request:
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _http_server(name: str) -> _Named:
    server = _Named(("127.0.0.1", 0), _Echo)
    server.name = name
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopThread:
    """An asyncio loop on a thread of its own, for the proxy, while the test talks to it blocking."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Env:
    proxy: EgressProxy
    loop: LoopThread
    socket_path: Path
    forwarder_port: int
    outside: _Named
    gateway: _Named
    echo_port: int
    logs: list[tuple[str, str]]

    @property
    def outside_port(self) -> int:
        return int(self.outside.server_address[1])

    def client(self) -> httpx.Client:
        return httpx.Client(proxy=f"http://127.0.0.1:{self.forwarder_port}", trust_env=False, timeout=5)

    def raw(self, data: bytes) -> socket.socket:
        """A connection through the forwarder, `data` sent."""
        s = socket.create_connection(("127.0.0.1", self.forwarder_port), timeout=5)
        s.sendall(data)
        return s


ALLOWED = ["127.0.0.1", "api.example.com", "*.example.com"]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    socket_path = tmp_path / "egress.sock"
    assert len(str(socket_path)) < 100, "unix socket paths are limited to 108 bytes"
    # Fork before any thread of ours exists: the child is then a clean copy, as from a zygote.
    forwarder_port = _free_port()
    pid = start_forwarder_process(forwarder_port, str(socket_path))
    outside, gateway = _http_server("outside"), _http_server("gateway")
    echo = _TCPServer(("127.0.0.1", 0), _EchoTCP)
    threading.Thread(target=echo.serve_forever, args=(0.05,), daemon=True).start()
    logs: list[tuple[str, str]] = []
    proxy = EgressProxy(
        gateway=("127.0.0.1", int(gateway.server_address[1])),
        log=lambda app, line: logs.append((app, line)),
        allow_internal=True,  # the local servers stand in for hosts on the internet
    )
    loop = LoopThread()
    try:
        loop.run(proxy.add_app("shop", socket_path, ALLOWED))
        yield Env(
            proxy, loop, socket_path, forwarder_port, outside, gateway, int(echo.server_address[1]), logs
        )
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loop.run(proxy.close())
        loop.stop()
        for server in (outside, gateway, echo):
            server.shutdown()
            server.server_close()


def _read_head(s: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_plain_http_to_an_allowed_host_is_relayed(env: Env) -> None:
    with env.client() as client:
        r = client.get(f"http://127.0.0.1:{env.outside_port}/a/b?c=d")
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["server"] == "outside" and got["path"] == "/a/b?c=d"
        assert got["host"] == f"127.0.0.1:{env.outside_port}"
        # One request per connection upstream, and the proxy's own headers stay with the proxy.
        assert got["connection"] == "close" and got["proxy_connection"] is None
        posted = client.post(f"http://127.0.0.1:{env.outside_port}/post", content=b"x" * 200_000).json()
        assert posted["method"] == "POST" and posted["body"] == "x" * 200_000
    assert ("shop", f"egress to 127.0.0.1:{env.outside_port}") in env.logs


def test_a_host_not_declared_is_refused_with_a_403_that_says_how_to_allow_it(env: Env) -> None:
    with env.client() as client:
        r = client.get("http://evil.test/steal")
    assert r.status_code == 403
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == (
        "osless egress: evil.test is not allowed for app shop; "
        'declare it with App("shop", egress=["evil.test"])\n'
    )
    assert env.logs == [("shop", "egress to evil.test:80 refused: not in App(egress=[...])")]


def test_an_osless_app_is_reached_through_the_gateway_by_name(env: Env) -> None:
    with env.client() as client:
        r = client.get("http://orders.osless/hello?x=1", headers={"X-Kept": "yes"})
        assert r.status_code == 200, r.text
        assert r.json() | {"body": ""} == {
            "server": "gateway",
            "method": "GET",
            "host": "orders.localhost",
            "path": "/hello?x=1",
            "connection": "close",
            "proxy_connection": None,
            "body": "",
        }
        assert client.get("http://bad_name.osless/").status_code == 400
    assert ("shop", "egress to orders.osless:80") in env.logs


def test_connect_to_an_allowed_host_relays_raw_bytes_both_ways(env: Env) -> None:
    s = env.raw(
        f"CONNECT 127.0.0.1:{env.echo_port} HTTP/1.1\r\nHost: 127.0.0.1:{env.echo_port}\r\n\r\n".encode()
    )
    with s:
        assert _read_head(s) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        # More than every buffer on the way holds, sent while reading: backpressure, not loss.
        payload = os.urandom(3 * 1024 * 1024)

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # half-close: the echo server ends when it sees our EOF

        sender = threading.Thread(target=send)
        sender.start()
        echoed = _read_all(s)
        sender.join()
    assert echoed == payload
    assert ("shop", f"egress to 127.0.0.1:{env.echo_port}") in env.logs


def test_connect_to_a_refused_host_gets_a_403(env: Env) -> None:
    with env.raw(b"CONNECT 10.1.2.3:443 HTTP/1.1\r\nHost: 10.1.2.3:443\r\n\r\n") as s:
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert answer.endswith(b'declare it with App("shop", egress=["10.1.2.3"])\n')
    assert env.logs == [("shop", "egress to 10.1.2.3:443 refused: not in App(egress=[...])")]


def test_connect_failure_is_a_502_that_says_why(env: Env) -> None:
    port = _free_port()  # nothing listens there
    with env.raw(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode()) as s:
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert f"osless egress: cannot connect to 127.0.0.1:{port}: ".encode() in answer


def test_wildcards_match_subdomains_only_and_case_does_not_matter() -> None:
    allowed = ["*.example.com", "Api.Other.org", "10.0.0.1", "::1"]
    assert host_allowed("a.example.com", allowed)
    assert host_allowed("A.B.Example.COM.", allowed)
    assert host_allowed("api.other.ORG", allowed)
    assert host_allowed("10.0.0.1", allowed) and host_allowed("[0:0::1]", allowed)
    assert not host_allowed("example.com", allowed)
    assert not host_allowed("evilexample.com", allowed)
    assert not host_allowed("x.api.other.org", allowed)
    assert not host_allowed("10.0.0.2", allowed)
    # The node's own loopback needs an exact entry; a wildcard never reaches it.
    assert not host_allowed("x.localhost", ["*.localhost"])
    assert not host_allowed("localhost", ["*.example.com"])
    assert host_allowed("localhost", ["localhost"])
    with pytest.raises(ValueError, match="bad egress entry"):
        host_allowed("a.com", ["*"])


def test_wildcards_and_loopback_through_the_proxy(env: Env) -> None:
    with env.client() as client:
        assert client.get("http://example.com/").status_code == 403  # *.example.com: subdomains only
        assert client.get("http://evilexample.com/").status_code == 403
        assert client.get(f"http://localhost:{env.outside_port}/").status_code == 403
    # A declared name that resolves to loopback does not open the node either ("127.1" is 127.0.0.1).
    loop_name = "127.1"
    env.loop.run(env.proxy.add_app("shop", env.socket_path, [loop_name]))
    with env.raw(f"GET http://{loop_name}:{env.outside_port}/ HTTP/1.1\r\n\r\n".encode()) as s:
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"resolves to 127.0.0.1, an address of this node" in answer


def test_garbage_is_a_400_and_a_huge_head_a_431(env: Env) -> None:
    for request in (
        b"\x16\x03\x01\x02\x00 hello\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # origin-form: not a proxy request
        b"GET http://127.0.0.1/ HTTP/1.1\r\nno colon here\r\n\r\n",
        b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",  # no port
        b"half a request",  # then EOF
    ):
        with env.raw(request) as s:
            s.shutdown(socket.SHUT_WR)
            assert _read_all(s).startswith(b"HTTP/1.1 400 Bad Request\r\n"), request
    with env.raw(b"GET http://127.0.0.1/ HTTP/1.1\r\nX: " + b"a" * 70_000) as s:
        assert _read_all(s).startswith(b"HTTP/1.1 431 ")


def test_one_bad_connection_does_not_hurt_the_forwarder(env: Env) -> None:
    s = env.raw(f"CONNECT 127.0.0.1:{env.echo_port} HTTP/1.1\r\n\r\n".encode())
    assert _read_head(s).startswith(b"HTTP/1.1 200")
    s.sendall(b"x" * 100_000)
    # Reset, not a clean close: SO_LINGER with a zero timeout.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    with env.client() as client:
        assert client.get(f"http://127.0.0.1:{env.outside_port}/still").json()["path"] == "/still"


def test_add_app_again_replaces_the_allowlist(env: Env) -> None:
    url = f"http://127.0.0.1:{env.outside_port}/"
    with env.client() as client:
        assert client.get(url).status_code == 200
        env.loop.run(env.proxy.add_app("shop", env.socket_path, ["api.example.com"]))
        assert client.get(url).status_code == 403


def test_remove_app_closes_its_socket_and_its_tunnels(env: Env) -> None:
    tunnel = env.raw(f"CONNECT 127.0.0.1:{env.echo_port} HTTP/1.1\r\n\r\n".encode())
    with tunnel:
        assert _read_head(tunnel).startswith(b"HTTP/1.1 200")
        env.loop.run(env.proxy.remove_app("shop"))
        assert _read_all(tunnel) == b""  # the open tunnel ends too
    assert not env.socket_path.exists()
    with socket.socket(socket.AF_UNIX) as u, pytest.raises(FileNotFoundError):
        u.connect(str(env.socket_path))
    # The forwarder still accepts, and closes what it cannot relay (a reset: the request went unread).
    with env.raw(b"GET http://127.0.0.1/ HTTP/1.1\r\n\r\n") as s, contextlib.suppress(ConnectionResetError):
        assert _read_all(s) == b""


def test_the_forwarder_reports_a_port_it_cannot_take(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="failed to start: OSError"):
            start_forwarder_process(taken.getsockname()[1], str(tmp_path / "x.sock"))
