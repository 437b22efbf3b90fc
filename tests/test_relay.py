"""node.relay and the gateway's remote backends: any node's gateway serves any app, reaching the
instances of other nodes through their node's relay, authenticated node to node."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from osless import relaywire
from osless.node.relay import MAX_OPENING, PREAMBLE_TIMEOUT_S, Local, Relay
from tests.platform import Node, Platform, copy_app, recv_until

APP = Path(__file__).parent / "apps" / "relayed"


class Fleet:
    def __init__(self, platform: Platform, node: Node) -> None:
        self.platform = platform
        self.node = node
        self.local = ""  # the app's instance on the platform's node
        self.remote = ""  # ...and on the joined one

    @property
    def gateways(self) -> list[str]:
        return [self.platform.gateway, self.node.gateway]

    def relay(self, node: str) -> tuple[str, int]:
        found = {n["name"]: n for n in self.platform.http("GET", "/v1/nodes").json()["items"]}
        host, _, port = found[node]["relay"].rpartition(":")
        return host, int(port)

    def admin(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.platform.token}"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Two nodes, and the `relayed` app with one instance on each."""
    root = tmp_path_factory.mktemp("relay")
    platform = Platform(root / "data").start()
    node = Node(platform, "second", root / "second")
    try:
        node.start()
        platform.deploy(APP)
        platform.cli("scale", "relayed", "--min", "2", "--max", "2")

        def placed() -> dict[str, str] | None:
            ready = {
                i["node"]: i["id"] for i in platform.instances("relayed") if i["status"]["phase"] == "ready"
            }
            return ready if len(ready) == 2 else None

        on = platform.wait_for(placed, timeout=90, what="an instance ready on each node")
        f = Fleet(platform, node)
        f.remote = on.pop("second")
        (f.local,) = on.values()
        yield f
    finally:
        node.stop()
        platform.stop()


def _connected_to(port: int) -> int:
    """How many TCP connections on this host are established to `port` (from /proc/net/tcp*)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote, state = fields[2], fields[3]
            count += state == "01" and int(remote.rsplit(":", 1)[1], 16) == port
    return count


def _answers(url: str, want: set[str], tries: int = 200) -> set[str]:
    """Which instances answer `url`, asked until all of `want` did (or `tries` is spent)."""
    seen: set[str] = set()
    with httpx.Client(timeout=10) as client:
        for _ in range(tries):
            r = client.get(url)
            assert r.status_code == 200, r.text
            seen.add(r.text)
            if seen >= want:
                break
    return seen


def test_every_gateway_serves_the_app_from_instances_on_both_nodes(fleet: Fleet) -> None:
    both = {fleet.local, fleet.remote}
    for gateway in fleet.gateways:
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        while not seen >= both and time.monotonic() < deadline:  # until the gateway has both routes
            seen |= _answers(f"{gateway}/relayed/", both, tries=50)
        assert seen == both, (gateway, seen)
    # Through a relay, a body of megabytes goes both ways whole (backpressure, not a buffer).
    body = os.urandom(4 * 1024 * 1024)
    seen = set()
    with httpx.Client(timeout=30) as client:
        for _ in range(40):
            r = client.post(f"{fleet.platform.gateway}/relayed/echo", content=body)
            assert r.status_code == 200 and r.content == body
            seen.add(r.headers["x-instance"])
            if fleet.remote in seen:
                break
    assert fleet.remote in seen


def test_a_function_is_invoked_through_the_other_nodes_gateway(fleet: Fleet) -> None:
    seen: set[str] = set()
    with httpx.Client(timeout=30, headers=fleet.admin()) as client:
        for _ in range(60):
            r = client.post(f"{fleet.node.gateway}/_functions/relayed/where", json=None)
            assert r.status_code == 200, r.text
            seen.add(r.json())
            if len(seen) == 2:
                break
    assert seen == {fleet.local, fleet.remote}


def test_a_websocket_goes_through_a_relay(fleet: Fleet) -> None:
    from websockets.sync.client import connect

    port = fleet.platform.http_port
    _, relay_port = fleet.relay("second")
    for _ in range(60):
        with connect(f"ws://127.0.0.1:{port}/relayed/ws") as ws:
            ws.send("hello")
            who, _, said = str(ws.recv(timeout=10)).partition(" ")
            assert said == "hello"
            if who != fleet.remote:
                continue
            for i in range(20):
                ws.send(f"m{i}")
                assert ws.recv(timeout=10) == f"{fleet.remote} m{i}"
            # The instance of the other node is reached through its relay, not its socket's path.
            assert _connected_to(relay_port) >= 1
            return
    raise AssertionError("no websocket reached the other node's instance")


def test_an_app_calls_another_across_nodes(fleet: Fleet) -> None:
    """`http://relayed.osless` from an instance: its node's egress proxy, its node's gateway, and any
    instance of the app, on either node."""
    pairs: set[tuple[str, str]] = set()
    with httpx.Client(timeout=30, headers=fleet.admin()) as client:
        for _ in range(80):
            gateway = fleet.gateways[len(pairs) % 2]
            r = client.post(f"{gateway}/_functions/relayed/call", json=None)
            assert r.status_code == 200, r.text
            got = r.json()
            pairs.add((got["caller"], got["callee"]))
            if {(fleet.local, fleet.remote), (fleet.remote, fleet.local)} <= pairs:
                break
    assert {(fleet.local, fleet.remote), (fleet.remote, fleet.local)} <= pairs, pairs


def _restarts(platform: Platform, instance: str) -> int:
    found = [i for i in platform.instances("relayed") if i["id"] == instance]
    return int(found[0]["status"]["restarts"]) if found else -1


def _both_answer(fleet: Fleet) -> None:
    """Until the platform's gateway routes to both instances again (one has just been restarted)."""
    both, seen = {fleet.local, fleet.remote}, set()
    deadline = time.monotonic() + 30
    while not seen >= both and time.monotonic() < deadline:
        seen |= _answers(f"{fleet.platform.gateway}/relayed/", both, tries=50)
    assert seen == both, seen


def test_a_get_whose_instance_dies_before_answering_is_answered_by_another(fleet: Fleet) -> None:
    """Through the other node's relay, and over the unix socket here: one rule for both."""
    platform = fleet.platform
    for victim in (fleet.remote, fleet.local):
        before = _restarts(platform, victim)
        with httpx.Client(timeout=30) as client:
            for _ in range(60):
                r = client.get(f"{platform.gateway}/relayed/die", params={"on": victim})
                assert r.status_code == 200, r.text
                assert r.text != victim
                if _restarts(platform, victim) > before:
                    break
        assert _restarts(platform, victim) > before, f"no request reached {victim}"
        _both_answer(fleet)


def test_a_post_whose_instance_dies_before_answering_is_not_sent_again(fleet: Fleet) -> None:
    """It reached the app: the app may have acted on it, so it is never sent to another instance
    (which would have answered 200); the client hears the 502 instead."""
    platform = fleet.platform
    for victim in (fleet.remote, fleet.local):
        before = _restarts(platform, victim)
        with httpx.Client(timeout=30) as client:
            for _ in range(60):
                r = client.post(f"{platform.gateway}/relayed/die", params={"on": victim}, content=b"once")
                if r.status_code != 200 or r.text == victim:
                    break
        assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway", r.text
        assert victim in r.json()["error"]["message"]
        platform.wait_for(lambda: _restarts(platform, victim) > before, what=f"{victim} restarted")  # noqa: B023
        _both_answer(fleet)


def _relay_says(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=15) as s:
        if data:
            s.sendall(data)
        answer = recv_until(s, lambda b: b"\n" in b)
        s.settimeout(5)
        assert s.recv(1024) == b"", "the relay keeps a refused connection open"
    return answer


def gateway_token(platform: Platform, node: str) -> tuple[str, str]:
    """(node token, gateway token) of a node of that name, made through the API as a node makes them."""
    node_token = platform.cli_json("tokens", "create", "--role", "node", "--name", node)["token"]
    r = httpx.post(
        f"{platform.api}/v1/nodes/{node}/gateway-token",
        headers={"authorization": f"Bearer {node_token}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    return node_token, r.json()["token"]


def test_the_relay_refuses_without_a_gateway_token(fleet: Fleet) -> None:
    second = fleet.relay("second")
    node_token, gw_token = gateway_token(fleet.platform, "probe")
    read_token = fleet.platform.cli_json("tokens", "create", "--role", "read")["token"]
    for line, code in [
        (f"OSLESS-RELAY/1 {fleet.remote} web\n", b"ERR bad_request"),  # no token at all
        (f"OSLESS-RELAY/1 osl_notatoken {fleet.remote} web\n", b"ERR unauthorized"),
        (f"OSLESS-RELAY/1 {read_token} {fleet.remote} web\n", b"ERR unauthorized"),
        (f"OSLESS-RELAY/1 {fleet.platform.token} {fleet.remote} web\n", b"ERR unauthorized"),  # admin
        (f"OSLESS-RELAY/1 {node_token} {fleet.remote} web\n", b"ERR unauthorized"),  # a node's own
        (f"OSLESS-RELAY/1 {gw_token} {fleet.local} web\n", b"ERR not_found"),  # not on this node
        (f"OSLESS-RELAY/1 {gw_token} {fleet.remote} shell\n", b"ERR bad_request"),
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"ERR bad_request"),
    ]:
        answer = _relay_says(second, line.encode())
        assert answer.startswith(code), (line, answer)
        assert gw_token.encode() not in answer and fleet.platform.token.encode() not in answer
    # Too long a preamble, or none in time: refused, and closed.
    assert _relay_says(second, b"x" * 5000).startswith(b"ERR too_large")
    started = time.monotonic()
    assert _relay_says(second, b"OSLESS-RELAY/1 ").startswith(b"ERR timeout")
    assert time.monotonic() - started < 10
    # With a gateway token, the instance of that node: OK, then the instance's HTTP.
    with socket.create_connection(second, timeout=15) as s:
        s.sendall(f"OSLESS-RELAY/1 {gw_token} {fleet.remote} web\n".encode())
        assert recv_until(s, lambda b: b"\n" in b) == b"OK\n"
        s.sendall(b"GET / HTTP/1.1\r\nHost: relayed\r\nConnection: close\r\n\r\n")
        answer = recv_until(s, lambda b: b.endswith(b"\r\n0\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 200") and fleet.remote.encode() in answer
    # The node's log holds no token.
    log = fleet.node.output()
    assert gw_token not in log and read_token not in log and fleet.platform.token not in log


def test_the_relay_refuses_connections_past_its_cap_at_once(fleet: Fleet) -> None:
    second = fleet.relay("second")
    held = [socket.create_connection(second, timeout=15) for _ in range(MAX_OPENING)]
    try:
        # Every one of them said nothing yet: the next is refused at once, not left to hold an fd.
        started = time.monotonic()
        assert _relay_says(second, b"").startswith(b"ERR busy")
        assert time.monotonic() - started < PREAMBLE_TIMEOUT_S
    finally:
        for s in held:
            s.close()

    def taken() -> bool:
        try:
            return _relay_says(second, b"OSLESS-RELAY/1 osl_x i shell\n").startswith(b"ERR bad_request")
        except ConnectionResetError:  # still busy: what was sent came after its refusal
            return False

    # Those gone, the relay takes connections again.
    fleet.platform.wait_for(taken, timeout=10, what="the relay to take connections again")


def test_the_relay_passes_half_closes_on_holds_back_a_fast_peer_and_checks_the_listener(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A relay in this process, against the platform's API, to unix sockets served here."""
    _, token = gateway_token(fleet.platform, "here")
    me = (os.getpid(), os.getuid())
    counting, holding, stranger = (str(tmp_path / n) for n in ("counting.sock", "holding.sock", "x.sock"))
    instances = {
        "counting": Local(counting, counting, me),
        "holding": Local(holding, holding, me),
        "stranger": Local(stranger, stranger, (me[0] + 1, me[1])),  # someone else listens there
    }

    async def main() -> None:
        gate = asyncio.Event()

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                data = await reader.read()  # until the peer's EOF, passed on by the relay
                writer.write(str(len(data)).encode())
                await writer.drain()
            finally:
                writer.close()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await gate.wait()
                while await reader.read(1 << 20):
                    pass
            finally:
                writer.close()

        servers = [
            await asyncio.start_unix_server(count, counting),
            await asyncio.start_unix_server(hold, holding),
            await asyncio.start_unix_server(count, stranger),
        ]
        relay = Relay(fleet.platform.api, instances.get, node="here")
        host, _, port = (await relay.start("127.0.0.1", 0)).rpartition(":")

        async def opened(instance: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(relaywire.preamble(token, instance, "web"))
            return reader, writer, await asyncio.wait_for(reader.readline(), 10)

        try:
            # Half-close: the instance hears the peer's EOF, and its answer still comes back.
            reader, writer, answer = await opened("counting")
            assert answer == b"OK\n"
            writer.write(b"x" * 3_000_000)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b"3000000"
            writer.close()
            await writer.wait_closed()
            # Backpressure: an instance that does not read holds the peer back, rather than the
            # relay buffering whatever the peer sends.
            reader, writer, answer = await opened("holding")
            assert answer == b"OK\n"
            sent, chunk = 0, b"y" * (1 << 20)
            with contextlib.suppress(TimeoutError):
                while sent < 256 << 20:
                    writer.write(chunk)
                    await asyncio.wait_for(writer.drain(), 2)
                    sent += len(chunk)
            assert sent < 64 << 20, f"{sent} bytes went in while the instance read none"
            gate.set()
            await asyncio.wait_for(writer.drain(), 30)  # it reads: the rest flows
            writer.close()
            await writer.wait_closed()
            # Someone else listening on an instance's socket gets nothing.
            _, writer, answer = await opened("stranger")
            assert answer.startswith(b"ERR unreachable"), answer
            writer.close()
            await writer.wait_closed()
        finally:
            await relay.close()
            for server in servers:
                server.close()
                await server.wait_closed()
            await asyncio.sleep(0.1)  # the servers' handlers see their connections close

    asyncio.run(main())


class _Load:
    """Requests, one after another on each of a few threads, to `url`, each recorded (when it
    ended, its status or error) until stopped."""

    def __init__(self, url: str, workers: int = 4) -> None:
        self.url = url
        self.results: list[tuple[float, int | str]] = []
        self._stop = threading.Event()
        self.workers = [threading.Thread(target=self._run) for _ in range(workers)]

    def _run(self) -> None:
        with httpx.Client(timeout=15) as client:
            while not self._stop.is_set():
                try:
                    status: int | str = client.get(self.url).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.results.append((time.monotonic(), status))

    def __enter__(self) -> _Load:
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for w in self.workers:
            w.join()

    def failed(self) -> list[tuple[float, int | str]]:
        return [r for r in self.results if r[1] != 200]


def test_a_rollout_across_nodes_fails_no_request(fleet: Fleet, tmp_path: Path) -> None:
    url = f"{fleet.platform.gateway}/relayed/"
    _answers(url, {fleet.local, fleet.remote})
    app = copy_app(APP, tmp_path / "relayed")
    (app / "app.py").write_text((app / "app.py").read_text() + "\n# v2\n")
    with _Load(url) as load:
        fleet.platform.deploy(app)

        def rolled() -> dict[str, str] | None:
            found = fleet.platform.instances("relayed")
            ready = {
                i["node"]: i["id"] for i in found if i["status"]["phase"] == "ready" and i["release"] == 2
            }
            return ready if len(ready) == 2 and len(found) == 2 else None

        on = fleet.platform.wait_for(rolled, timeout=90, what="v2 ready on each node, v1 gone")
        time.sleep(1)
    assert not load.failed(), load.failed()
    assert len(load.results) > 50
    fleet.remote = on.pop("second")
    (fleet.local,) = on.values()
    _answers(url, {fleet.local, fleet.remote})


def test_a_node_killed_leaves_the_other_gateway_serving_from_its_own_instance(fleet: Fleet) -> None:
    url = f"{fleet.platform.gateway}/relayed/"
    _answers(url, {fleet.local, fleet.remote})
    with _Load(url) as load:
        time.sleep(1)
        assert fleet.node.proc is not None
        fleet.node.proc.kill()
        killed = time.monotonic()
        fleet.node.proc.wait()
        time.sleep(4)
    # None: the requests in flight on the dead node, and those sent to its relay before its lease
    # ran out, went to the instance here (a GET may be sent twice).
    assert not load.failed(), load.failed()
    after = [r for r in load.results if r[0] > killed + 1]
    assert len(after) > 20, len(after)
    # Only instances of the node left answer: the one it had, and the dead node's replacement,
    # placed there by now (a node's lease is 3 s).
    alive = {i["id"] for i in fleet.platform.instances("relayed") if i["node"] != "second"}
    seen = _answers(url, {fleet.local}, tries=20)
    assert fleet.local in seen and seen <= alive and fleet.remote not in seen, (seen, alive)
