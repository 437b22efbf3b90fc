"""Egress: an instance reaches only what its app lists and the operator allows, through the forwarder
and the node's proxy.

Everything is real. The "outside hosts" are servers in a network namespace the tests make (a veth
pair, a private subnet of their own): the proxy reaches them only because it is given that subnet
as `osless up --egress-allow` gives it. The host's side of the veth, the host's other addresses and
127.0.0.1 are this host's own, each with a server listening, so that a refusal is the proxy's doing
and not an empty port. The proxy serves app `shop` on a unix socket and the forwarder relays TCP to
it; the last test runs a real platform and a real app in its sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import socketserver
import struct
import subprocess
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from osless.node.egress import MAX_CALLS_PER_APP, MAX_CONNECTIONS_PER_APP, EgressProxy, host_allowed
from osless.node.egress_rules import parse_networks
from osless.runtime.forwarder import start_forwarder_process
from tests.platform import OSLESS, Platform, copy_app

T = TypeVar("T")
APPS = Path(__file__).parent / "apps"
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


class _Named(ThreadingHTTPServer):
    daemon_threads = True
    name = ""

    def server_bind(self) -> None:
        # HTTPServer's own looks the address up in DNS (getfqdn): slow, and nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str = "/", host: str | None = None) -> str:
        host = host or str(self.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{path}"


class _Named6(_Named):
    address_family = socket.AF_INET6


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


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()


def _http_server(name: str, address: str = "127.0.0.1", port: int = 0) -> _Named:
    server = (_Named6 if ":" in address else _Named)((address, port), _Echo)
    server.name = name
    _serve(server)
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _in_netns(netns: str, make: Callable[[], T]) -> T:
    """`make()` on a thread that joined `netns`: the sockets it opens live in that namespace."""
    out: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, os.strerror(code))
            finally:
                os.close(fd)
            out.append(make())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def _global_addresses() -> list[str]:
    """This host's addresses on the interface of its default route, as `ip` reports them."""
    devices = {route["dev"] for route in json.loads(_ip("-j", "route", "show", "default"))}
    return [
        info["local"]
        for dev in sorted(devices)
        for link in json.loads(_ip("-j", "addr", "show", "dev", dev, "scope", "global"))
        for info in link.get("addr_info", [])
        if "local" in info
    ]


@dataclass
class Net:
    """The test's own network: a namespace behind a veth pair, and servers everywhere."""

    network: str  # the subnet, e.g. 10.213.7.0/24
    outside_ip: str  # .2, in the namespace
    other_ip: str  # .3, also in the namespace
    host_ip: str  # .1, this host's side of the veth: an address of this host
    outside: _Named  # in the namespace, on all of its addresses
    echo_port: int  # a TCP echo in the namespace
    host: _Named  # on host_ip
    own: list[_Named]  # on each of this host's other addresses (eth0...)
    loopback: _Named  # on 127.0.0.1
    loopback6: _Named  # on ::1, the same port
    gateway: _Named  # the platform's gateway stand-in, on 127.0.0.1
    servers: list[socketserver.BaseServer] = field(default_factory=list)


@pytest.fixture(scope="module")
def forwarder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The forwarder, relaying 127.0.0.1:PORT to the socket each test's proxy serves."""
    socket_path = tmp_path_factory.mktemp("egress") / "egress.sock"
    assert len(str(socket_path)) < 100, "unix socket paths are limited to 108 bytes"
    # Forked before any thread of ours exists (`net` waits for it): a clean copy, as from a zygote.
    port = _free_port()
    pid = start_forwarder_process(port, str(socket_path))
    try:
        yield port, socket_path
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.fixture(scope="module")
def net(forwarder: tuple[int, Path]) -> Iterator[Net]:
    used = _ip("-4", "-o", "addr") + _ip("-4", "route")
    n = next(n for n in random.sample(range(1, 255), 254) if f"10.213.{n}." not in used)
    netns, veth, peer = f"osless-eg{os.getpid()}", f"oseg{os.getpid()}", f"osegp{os.getpid()}"
    servers: list[socketserver.BaseServer] = []
    _ip("netns", "add", netns)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", netns)
        _ip("addr", "add", f"10.213.{n}.1/24", "dev", veth)
        _ip("link", "set", veth, "up")
        for last in (2, 3):
            _ip("-n", netns, "addr", "add", f"10.213.{n}.{last}/24", "dev", peer)
        _ip("-n", netns, "link", "set", peer, "up")
        _ip("-n", netns, "link", "set", "lo", "up")

        def inside() -> tuple[_Named, _TCPServer]:
            echo = _TCPServer(("0.0.0.0", 0), _EchoTCP)
            _serve(echo)
            return _http_server("outside", "0.0.0.0"), echo

        outside, echo = _in_netns(netns, inside)
        servers += [outside, echo]
        host = _http_server("host", f"10.213.{n}.1")
        own = [_http_server(f"own {a}", a) for a in _global_addresses()]
        loopback, loopback6 = _loopback_pair()
        gateway = _http_server("gateway")
        servers += [host, *own, loopback, loopback6, gateway]
        yield Net(
            network=f"10.213.{n}.0/24",
            outside_ip=f"10.213.{n}.2",
            other_ip=f"10.213.{n}.3",
            host_ip=f"10.213.{n}.1",
            outside=outside,
            echo_port=int(echo.server_address[1]),
            host=host,
            own=own,
            loopback=loopback,
            loopback6=loopback6,
            gateway=gateway,
        )
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _loopback_pair() -> tuple[_Named, _Named]:
    """Servers on 127.0.0.1 and ::1 at one port: every loopback spelling finds one listening."""
    for _ in range(20):
        v4 = _http_server("loopback")
        try:
            return v4, _http_server("loopback6", "::1", v4.port)
        except OSError:
            v4.shutdown()
            v4.server_close()
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


class LoopThread:
    """An asyncio loop on a thread of its own, for the proxy, while the test talks to it blocking."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=20)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Env:
    loop: LoopThread
    socket_path: Path
    forwarder_port: int
    net: Net
    logs: list[tuple[str, str]]
    proxy: EgressProxy | None = None

    def start(self, egress: list[str], *, allow: list[str]) -> EgressProxy:
        """(Re)start the node's proxy as `osless up --egress-allow A ...` would, serving `shop` with
        `App(egress=egress)`."""
        if self.proxy is not None:
            self.loop.run(self.proxy.close())
        self.proxy = EgressProxy(
            gateway=("127.0.0.1", self.net.gateway.port),
            log=lambda app, line: self.logs.append((app, line)),
            allow=parse_networks(allow),
        )
        self.loop.run(self.proxy.add_app("shop", self.socket_path, egress))
        return self.proxy

    def client(self) -> httpx.Client:
        return httpx.Client(proxy=f"http://127.0.0.1:{self.forwarder_port}", trust_env=False, timeout=10)

    def raw(self, data: bytes) -> socket.socket:
        """A connection through the forwarder, `data` sent."""
        s = socket.create_connection(("127.0.0.1", self.forwarder_port), timeout=10)
        s.sendall(data)
        return s

    def get(self, url: str) -> bytes:
        """A proxied GET of `url` as it is written (no client normalizes the host): the whole answer."""
        with self.raw(f"GET {url} HTTP/1.1\r\n\r\n".encode()) as s:
            return _read_all(s)


@pytest.fixture
def env(forwarder: tuple[int, Path], net: Net) -> Iterator[Env]:
    port, socket_path = forwarder
    loop = LoopThread()
    env = Env(loop, socket_path, port, net, [])
    try:
        env.start([net.outside_ip, "api.example.com", "*.example.com"], allow=[net.network])
        yield env
    finally:
        if env.proxy is not None:
            loop.run(env.proxy.close())
        loop.stop()


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


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_plain_http_to_an_allowed_host_is_relayed(env: Env) -> None:
    outside = env.net.outside
    with env.client() as client:
        r = client.get(outside.url("/a/b?c=d", env.net.outside_ip))
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["server"] == "outside" and got["path"] == "/a/b?c=d"
        assert got["host"] == f"{env.net.outside_ip}:{outside.port}"
        # One request per connection upstream, and the proxy's own headers stay with the proxy.
        assert got["connection"] == "close" and got["proxy_connection"] is None
        url = outside.url("/post", env.net.outside_ip)
        posted = client.post(url, content=b"x" * 200_000).json()
        assert posted["method"] == "POST" and posted["body"] == "x" * 200_000
    assert ("shop", f"egress to {env.net.outside_ip}:{outside.port}") in env.logs


def test_a_host_not_declared_is_refused_with_a_403_that_says_how_to_allow_it(env: Env) -> None:
    with env.client() as client:
        r = client.get("http://evil.test/steal")
        assert r.status_code == 403
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == (
            "osless egress: evil.test is not allowed for app shop; "
            'declare it with App("shop", egress=["evil.test"])\n'
        )
        # In the operator's range and listening, but not listed: the app's list still decides.
        other = client.get(env.net.outside.url("/", env.net.other_ip))
        assert other.status_code == 403
        assert f'declare it with App("shop", egress=["{env.net.other_ip}"])' in other.text
    assert env.logs[0] == ("shop", "egress to evil.test:80 refused: not in App(egress=[...])")


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
    where = f"{env.net.outside_ip}:{env.net.echo_port}"
    s = env.raw(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n\r\n".encode())
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
    assert ("shop", f"egress to {where}") in env.logs


def test_connect_to_a_host_not_declared_gets_a_403(env: Env) -> None:
    with env.raw(b"CONNECT 10.1.2.3:443 HTTP/1.1\r\nHost: 10.1.2.3:443\r\n\r\n") as s:
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    # Listing it would not be enough: the answer says who else must agree.
    assert answer.endswith(
        b'declare it with App("shop", egress=["10.1.2.3"]); it is also a private address '
        b"(10.0.0.0/8), which only the operator can allow, with osless up --egress-allow 10.1.2.3/32\n"
    )
    assert env.logs == [("shop", "egress to 10.1.2.3:443 refused: not in App(egress=[...])")]


def test_connect_failure_is_a_502_that_says_why(env: Env) -> None:
    where = f"{env.net.outside_ip}:1"  # nothing listens there
    with env.raw(f"CONNECT {where} HTTP/1.1\r\n\r\n".encode()) as s:
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert f"osless egress: cannot connect to {where}: ".encode() in answer


def test_an_internal_range_is_reached_only_when_the_operator_allows_it(env: Env) -> None:
    url = env.net.outside.url("/", env.net.outside_ip)
    assert json.loads(env.get(url).split(b"\r\n\r\n", 1)[1])["server"] == "outside"
    # The same list, from a proxy started without --egress-allow: the app's list is not enough.
    env.start([env.net.outside_ip], allow=[])
    answer = env.get(url)
    assert _status(answer) == 403
    assert answer.endswith(
        f"osless egress: {env.net.outside_ip} is not allowed for app shop: it is a private address "
        f"(10.0.0.0/8), which only the operator can allow, with osless up --egress-allow "
        f"{env.net.outside_ip}/32\n".encode()
    )
    refusal = f"egress to {env.net.outside_ip}:{env.net.outside.port} refused: it is a private address"
    assert any(app == "shop" and line.startswith(refusal) for app, line in env.logs), env.logs


def test_this_hosts_own_addresses_are_refused_even_when_listed_and_in_an_allowed_range(env: Env) -> None:
    own = [(env.net.host_ip, env.net.host), *((str(s.server_address[0]), s) for s in env.net.own)]
    # host_ip is inside the allowed subnet; a range (127.0.0.0/8 here) never opens this host.
    env.start([address for address, _ in own], allow=[env.net.network, "127.0.0.0/8"])
    for address, server in own:
        answer = env.get(server.url("/", address))
        assert _status(answer) == 403, (address, answer)
        assert b"it is an address of this host, which only the operator can allow" in answer
    # Only an entry that is the address itself opens it.
    env.start([env.net.host_ip], allow=[env.net.network, f"{env.net.host_ip}/32"])
    answer = env.get(env.net.host.url("/"))
    assert _status(answer) == 200 and json.loads(answer.split(b"\r\n\r\n", 1)[1])["server"] == "host"


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "127.0.0.2",
    "0177.0.0.1",
    "0x7f000001",
    "2130706433",
    "0.0.0.0",
    "0",
    "[::1]",
    "[::]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:0:0:1]",
    "localhost",
    "LocalHost.",
]


def test_loopback_in_every_spelling_is_refused_though_listed(env: Env) -> None:
    env.start([h.strip("[]") for h in LOOPBACK_SPELLINGS], allow=[env.net.network])
    port = env.net.loopback.port  # a server listens there on 127.0.0.1 and on ::1
    for host in LOOPBACK_SPELLINGS:
        answer = env.get(f"http://{host}:{port}/")
        assert _status(answer) == 403, (host, answer)
        assert b"which only the operator can allow, with osless up --egress-allow" in answer, answer
        with env.raw(f"CONNECT {host}:{port} HTTP/1.1\r\n\r\n".encode()) as s:
            assert _status(_read_all(s)) == 403, host


def test_a_name_is_checked_by_the_address_it_resolves_to(env: Env) -> None:
    env.start(["localhost"], allow=[env.net.network])
    answer = env.get(env.net.loopback.url("/", "localhost"))
    assert _status(answer) == 403
    assert (
        b"localhost is not allowed for app shop: it resolves to 127.0.0.1, an address of this host" in answer
    )
    # Allowed by its exact address, the name reaches it, at the address that was checked.
    env.start(["localhost"], allow=["127.0.0.1/32"])
    answer = env.get(env.net.loopback.url("/", "localhost"))
    assert _status(answer) == 200
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["server"] == "loopback"


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
    assert not host_allowed("1.2.3.4", ["*.4"])  # a wildcard never matches an address
    with pytest.raises(ValueError, match="bad egress entry"):
        host_allowed("a.com", ["*"])


def test_wildcards_through_the_proxy(env: Env) -> None:
    with env.client() as client:
        assert client.get("http://example.com/").status_code == 403  # *.example.com: subdomains only
        assert client.get("http://evilexample.com/").status_code == 403


def test_garbage_is_a_400_and_a_huge_head_a_431(env: Env) -> None:
    for request in (
        b"\x16\x03\x01\x02\x00 hello\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # origin-form: not a proxy request
        b"GET http://127.0.0.1/ HTTP/1.1\r\nno colon here\r\n\r\n",
        b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n",  # no port
        b"GET http://" + b"a" * 64 + b".example.com/ HTTP/1.1\r\n\r\n",  # a label past 63
        b"CONNECT " + b"a." * 127 + b"com:443 HTTP/1.1\r\n\r\n",  # a name past 253
        b"half a request",  # then EOF
    ):
        with env.raw(request) as s:
            s.shutdown(socket.SHUT_WR)
            assert _read_all(s).startswith(b"HTTP/1.1 400 Bad Request\r\n"), request
    with env.raw(b"GET http://127.0.0.1/ HTTP/1.1\r\nX: " + b"a" * 70_000) as s:
        assert _read_all(s).startswith(b"HTTP/1.1 431 ")


def test_one_bad_connection_does_not_hurt_the_forwarder(env: Env) -> None:
    s = env.raw(f"CONNECT {env.net.outside_ip}:{env.net.echo_port} HTTP/1.1\r\n\r\n".encode())
    assert _read_head(s).startswith(b"HTTP/1.1 200")
    s.sendall(b"x" * 100_000)
    # Reset, not a clean close: SO_LINGER with a zero timeout.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    with env.client() as client:
        assert client.get(env.net.outside.url("/still", env.net.outside_ip)).json()["path"] == "/still"


def test_add_app_again_replaces_the_allowlist(env: Env) -> None:
    url = env.net.outside.url("/", env.net.outside_ip)
    assert env.proxy is not None
    with env.client() as client:
        assert client.get(url).status_code == 200
        env.loop.run(env.proxy.add_app("shop", env.socket_path, ["api.example.com"]))
        assert client.get(url).status_code == 403


def test_remove_app_closes_its_socket_and_its_tunnels(env: Env) -> None:
    assert env.proxy is not None
    tunnel = env.raw(f"CONNECT {env.net.outside_ip}:{env.net.echo_port} HTTP/1.1\r\n\r\n".encode())
    with tunnel:
        assert _read_head(tunnel).startswith(b"HTTP/1.1 200")
        env.loop.run(env.proxy.remove_app("shop"))
        assert _read_all(tunnel) == b""  # the open tunnel ends too
    assert not env.socket_path.exists()
    with socket.socket(socket.AF_UNIX) as u, pytest.raises(FileNotFoundError):
        u.connect(str(env.socket_path))
    # The forwarder still accepts, and closes what it cannot relay without a byte of answer (a
    # reset, or a plain close: the request went unread either way).
    with env.raw(f"GET {env.net.outside.url('/', env.net.outside_ip)} HTTP/1.1\r\n\r\n".encode()) as s:
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
    assert answer == b""


def test_the_forwarder_reports_a_port_it_cannot_take(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match="failed to start: OSError"):
            start_forwarder_process(taken.getsockname()[1], str(tmp_path / "x.sock"))


def test_a_bad_egress_allow_stops_osless_up_with_a_clear_message(tmp_path: Path) -> None:
    r = subprocess.run(
        [OSLESS, "up", "--data-dir", str(tmp_path / "data"), "--egress-allow", "10.1.2.3/24"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert r.stderr.strip() == (
        "error: --egress-allow '10.1.2.3/24': expected an address or a CIDR range (the range is 10.1.2.0/24)"
    )
    assert not (tmp_path / "data").exists()


def test_an_app_reaches_what_it_lists_and_the_operator_allows_and_nothing_else(
    net: Net, tmp_path: Path
) -> None:
    """As shipped: a real platform started with --egress-allow, a real app in its sandbox, its
    HTTP_PROXY the in-sandbox forwarder, the node's proxy."""
    app = copy_app(APPS / "fetcher", tmp_path / "fetcher")
    own = [(str(s.server_address[0]), s) for s in net.own if s.address_family == socket.AF_INET]
    (app / "egress.json").write_text(json.dumps([net.outside_ip, net.host_ip, *(a for a, _ in own)]))
    platform = Platform(tmp_path / "data", args=["--egress-allow", net.network]).start()
    try:
        platform.deploy(app)

        def fetch(url: str) -> dict[str, Any]:
            status, body = platform.invoke("fetcher", "fetch", {"url": url})
            assert status == 200, body
            result: dict[str, Any] = body
            return result

        got = fetch(net.outside.url("/from-the-sandbox", net.outside_ip))
        assert got["status"] == 200, got
        assert json.loads(got["body"])["server"] == "outside"
        assert json.loads(got["body"])["path"] == "/from-the-sandbox"
        # Not listed (though in the operator's range, and listening): the app's own list refuses it.
        other = fetch(net.outside.url("/", net.other_ip))
        assert other["status"] == 403
        assert f'declare it with App("fetcher", egress=["{net.other_ip}"])' in other["body"]
        # Listed, and in the operator's range, but this host's own: refused, and only the operator may.
        for address, server in [(net.host_ip, net.host), *own]:
            refused = fetch(server.url("/", address))
            assert refused["status"] == 403, (address, refused)
            assert refused["body"] == (
                f"osless egress: {address} is not allowed for app fetcher: it is an address of this host, "
                f"which only the operator can allow, with osless up --egress-allow {address}/32\n"
            )
        logs = platform.cli("logs", "fetcher", "--tail", "50").stdout
        assert f"egress to {net.outside_ip}:{net.outside.port}" in logs
        assert f"egress to {net.host_ip}:{net.host.port} refused: it is an address of this host" in logs
    finally:
        platform.stop()


def test_an_app_has_a_bounded_number_of_function_calls_under_way(tmp_path: Path) -> None:
    # Each call's event (up to 6 MiB) is held in the node agent until the API answers: an app opening
    # call after call must not fill the agent's memory, nor the node's one pool of calls to the API.
    async def main() -> None:
        release = asyncio.Event()
        running: list[str] = []

        async def call(
            caller: str, app: str, fn: str, body: bytes, rid: str, trace: str
        ) -> tuple[int, str, bytes]:
            running.append(caller)
            await release.wait()
            return 200, "application/json", b'{"ok": true}'

        proxy = EgressProxy(gateway=("127.0.0.1", 9), log=lambda app, message: None, call=call)
        sock = tmp_path / "shop.sock"
        await proxy.add_app("shop", sock, [])
        await proxy.add_app("orders", tmp_path / "orders.sock", [])
        event = b"0" * 65536
        head = (
            b"POST http://orders.osless/__osless__/functions/quote HTTP/1.1\r\nHost: orders.osless\r\n"
            b"Content-Length: %d\r\n\r\n" % len(event)
        )

        async def open_call(path: Path, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(head + body)
            return reader, writer

        held = [await open_call(sock, event) for _ in range(MAX_CALLS_PER_APP)]
        async with asyncio.timeout(10):
            while len(running) < MAX_CALLS_PER_APP:
                await asyncio.sleep(0.01)
        # One more: refused at once, before its event is read (it never sends it).
        reader, writer = await open_call(sock, b"")
        refused = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert refused.startswith(b"HTTP/1.1 429 "), refused[:200]
        error = json.loads(refused.split(b"\r\n\r\n", 1)[1])["error"]
        assert error["code"] == "too_many_calls" and str(MAX_CALLS_PER_APP) in error["message"], error
        # Another app on the node is not held back by this one's calls.
        reader, writer = await open_call(tmp_path / "orders.sock", event)
        async with asyncio.timeout(10):
            while running.count("orders") < 1:
                await asyncio.sleep(0.01)
        release.set()
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        for reader, writer in held:
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
            writer.close()
        # Calls that ended give their place back.
        reader, writer = await open_call(sock, event)
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200 ")
        writer.close()
        await proxy.close()

    asyncio.run(main())


def test_a_number_in_non_ascii_digits_is_a_clear_refusal(tmp_path: Path) -> None:
    # str.isdigit() holds for '²' (Latin-1 0xB2), which int() refuses: the connection's task raised,
    # the app got no answer and the agent's log a traceback, as often as an app liked.
    async def main() -> None:
        async def call(
            caller: str, app: str, fn: str, body: bytes, rid: str, trace: str
        ) -> tuple[int, str, bytes]:
            return 200, "application/json", b"{}"

        proxy = EgressProxy(gateway=("127.0.0.1", 9), log=lambda app, message: None, call=call)
        sock = tmp_path / "shop.sock"
        await proxy.add_app("shop", sock, [])
        for head, status in (
            (
                b"POST http://orders.osless/__osless__/functions/quote HTTP/1.1\r\n"
                b"Content-Length: \xb2\r\n\r\n",
                411,
            ),
            (b"GET http://example.com:\xb2/ HTTP/1.1\r\n\r\n", 400),
            (b"CONNECT example.com:\xb2 HTTP/1.1\r\n\r\n", 400),
        ):
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(head)
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 %d " % status), (head, answer[:200])
        await proxy.close()

    asyncio.run(main())


def test_an_app_holds_a_bounded_number_of_connections(tmp_path: Path) -> None:
    # Each connection, even one that never says a word (for the head's 30 s), holds a socket of the
    # agent's, whose sockets serve every app on the node: one app must not take them all.
    async def main() -> None:
        proxy = EgressProxy(gateway=None, log=lambda app, message: None)
        sock = tmp_path / "shop.sock"
        await proxy.add_app("shop", sock, [])
        await proxy.add_app("orders", tmp_path / "orders.sock", [])
        held = [await asyncio.open_unix_connection(str(sock)) for _ in range(MAX_CONNECTIONS_PER_APP)]
        await asyncio.sleep(0.2)  # all accepted
        reader, writer = await asyncio.open_unix_connection(str(sock))
        refused = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert refused.startswith(b"HTTP/1.1 429 "), refused[:200]
        assert f"{MAX_CONNECTIONS_PER_APP} connections".encode() in refused, refused[:200]

        async def ask(path: Path) -> bytes:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"GET http://example.com/ HTTP/1.1\r\n\r\n")  # not listed: a 403
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer

        # Another app is served all the same; a connection closed gives its place back.
        assert (await ask(tmp_path / "orders.sock")).startswith(b"HTTP/1.1 403 ")
        held.pop()[1].close()
        await asyncio.sleep(0.1)
        assert (await ask(sock)).startswith(b"HTTP/1.1 403 ")
        for _, w in held:
            w.close()
        await proxy.close()

    asyncio.run(main())
