"""The node's egress proxy: the only way out of an instance, and only to the hosts its app declares.

Instances have only loopback. Their `HTTP_PROXY`/`HTTPS_PROXY` point at the in-sandbox forwarder
(`osless.runtime.forwarder`), which relays each connection to a unix socket of this proxy. There is
one socket per app, so the socket a connection arrives on says which app is asking: nothing the
app sends can claim to be another app.

Per connection, one HTTP/1.1 request head:
- `CONNECT host:port` (HTTPS and anything else over TCP): a tunnel, if the app may reach `host`;
- `GET http://host[:port]/path` (any method, absolute-form): `{app}.osless` goes to that osless
  app through the gateway (`Host: {app}.localhost`); any other allowed host directly. The head is
  rewritten to origin-form with `Connection: close`, then bytes are relayed as they are: one
  request per connection.
- `POST http://{app}.osless/__osless__/functions/{function}` (what `osless.function("app.fn")`
  sends): a call of that function as the calling app, handed to `call` (the node agent, which asks
  the API with the node's token, naming the app this socket is for). `POST
  http://{app}.osless/__osless__/queues/{queue}/messages` (`osless.queue(...).send`) likewise.
  The app's own headers claim nothing: who calls is the socket's app, and the callee's grants
  decide (api/routes/functions.py).
Where a connection may go is decided twice: the app's list names the hosts (by name, `*.domain` or
address), and the operator's rules (`egress_rules`) refuse internal addresses and this host's own,
whatever the app lists, unless `osless up --egress-allow CIDR` allows them. A name is resolved once;
each address is checked, and the proxy connects to the very address it checked.
Refusals are a 403 whose body says how to allow the host (or that only the operator can), and a
line in the app's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from osless.node.egress_rules import AddressPolicy, Network
from osless.sdk import traceparent
from osless.sdk.app import NAME_RE

__all__ = [
    "CALL_BODY_LIMIT",
    "CONNECT_TIMEOUT_S",
    "HEAD_LIMIT",
    "HEAD_TIMEOUT_S",
    "MAX_CALLS_PER_APP",
    "MAX_CONNECTIONS_PER_APP",
    "CallFunction",
    "EgressProxy",
    "host_allowed",
]

HEAD_LIMIT = 64 * 1024
# A client that opens a connection and says nothing must not hold it forever.
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
OSLESS_SUFFIX = ".osless"
GATEWAY_DOMAIN = "localhost"
_CHUNK = 64 * 1024
# `/__osless__/` never reaches an app (the gateway refuses it): the platform's paths, here too.
PLATFORM_PATH = "/__osless__/"
CALL_PATH = re.compile(r"/__osless__/functions/([A-Za-z_][A-Za-z0-9_]{0,63})")
# `osless.queue(...).send`: handed to `call` as the function `queue:{name}` (no function's name has `:`)
SEND_PATH = re.compile(r"/__osless__/queues/([a-z][a-z0-9_-]{0,62})/messages")
CALL_BODY_LIMIT = 6 * 1024 * 1024  # the API's own limit on a request body
# Function calls an app may have under way at once: each holds its event (up to CALL_BODY_LIMIT) in
# the agent until the API answers, and a place in the node's one pool of connections to the API.
MAX_CALLS_PER_APP = 32
# Connections an app may hold open to the proxy at once (tunnels, calls, and ones that say nothing):
# each costs the agent a socket or two, and the agent's sockets serve every app on the node.
MAX_CONNECTIONS_PER_APP = 256
_OPERATOR = "only the operator can allow, with osless up --egress-allow"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_ID = re.compile(r"[!-~]{1,64}")
_DIGITS = re.compile(r"[0-9]{1,18}")  # not str.isdigit(): it holds for '²', which int() refuses
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
# Hop-by-hop headers (RFC 9110 7.6.1) and the proxy's own; Transfer-Encoding stays: the body is
# relayed as it is, so its framing must travel with it.
_HOP_BY_HOP = {
    "connection",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# (calling app, app, function, event as JSON bytes, request id) -> (status, content type, body)
CallFunction = Callable[[str, str, str, bytes, str, str], Awaitable[tuple[int, str, bytes]]]


class _BadRequest(Exception):
    pass


def _normalize(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def _ip(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class _Allowlist:
    """An app's egress entries: exact hostnames, `*.domain` (subdomains only, any depth), or IPs."""

    def __init__(self, entries: list[str]) -> None:
        self.names: set[str] = set()
        self.ips: set[Address] = set()
        self.suffixes: list[str] = []
        for raw in entries:
            entry = _normalize(raw)
            if entry.startswith("*."):
                if not _HOSTNAME.fullmatch(entry[2:]):
                    raise ValueError(f"bad egress entry {raw!r}: expected a host, *.domain or an IP")
                self.suffixes.append(entry[1:])
            elif (ip := _ip(entry)) is not None:
                self.ips.add(ip)
            elif _HOSTNAME.fullmatch(entry):
                self.names.add(entry)
            else:
                raise ValueError(f"bad egress entry {raw!r}: expected a host, *.domain or an IP")

    def exact(self, host: str) -> bool:
        ip = _ip(host)
        return ip in self.ips if ip is not None else host in self.names

    def allows(self, host: str) -> bool:
        if self.exact(host):
            return True
        return _ip(host) is None and any(host.endswith(suffix) for suffix in self.suffixes)


def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether `App(egress=allowed)` names `host`. The proxy then also checks each address the host
    resolves to against the operator's rules (`egress_rules`), whatever the app lists."""
    return _Allowlist(allowed).allows(_normalize(host))


@dataclass
class _Served:
    app: str
    path: Path
    allowed: _Allowlist
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    removed: bool = False


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]


class _Refused(Exception):
    """Every address the host resolves to is one the operator's rules refuse."""


def _parse_head(head: bytes) -> _Request:
    text = head.decode("latin-1")
    lines = text[:-4].split("\r\n")
    if any(c in line for line in lines for c in "\r\n\0"):
        raise _BadRequest("bare CR, LF or NUL in the request head")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest("expected an HTTP/1.1 request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _BadRequest(f"malformed header line {line[:100]!r}")
        headers.append((name, value.strip(" \t")))
    return _Request(parts[0], parts[1], parts[2], headers)


def _split_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _BadRequest(f"bad host in {authority!r}")
        host, rest = authority[1:end], authority[end + 1 :]
        if _ip(host) is None or (rest and not rest.startswith(":")):
            raise _BadRequest(f"bad host in {authority!r}")
        port_text = rest[1:] if rest else ""
    else:
        host, sep, port_text = authority.partition(":")
        if ":" in port_text:
            raise _BadRequest(f"bad host in {authority!r} (IPv6 addresses go in brackets)")
        if sep and not port_text:
            raise _BadRequest(f"empty port in {authority!r}")
    host = _normalize(host)
    if not host or (_ip(host) is None and not _HOSTNAME.fullmatch(host)):
        raise _BadRequest(f"bad host in {authority!r}")
    if not port_text:
        if default_port is None:
            raise _BadRequest(f"CONNECT needs host:port, got {authority!r}")
        return host, default_port
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise _BadRequest(f"bad port in {authority!r}")
    return host, int(port_text)


def _split_absolute(target: str) -> tuple[str, int, str]:
    """`http://host[:port]/path?q` -> (host, port, `/path?q`)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        if target.startswith("/"):
            raise _BadRequest("this is the egress proxy: send requests through it as a proxy (absolute-form)")
        if scheme.lower() == "https":
            raise _BadRequest("https goes through the proxy with CONNECT")
        raise _BadRequest(f"expected http://host/path, got {target[:200]!r}")
    rest = rest.split("#", 1)[0]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if "@" in authority:
        raise _BadRequest("user info in the URL is not supported")
    host, port = _split_authority(authority, 80)
    if not path.startswith("/"):
        path = "/" + path
    return host, port, path


def _single(address: str) -> str:
    """`address` as a one-address CIDR, for the operator's `--egress-allow`."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ip.ipv4_mapped or ipaddress.IPv6Address(int(ip))  # as the rules judge it: no %scope
    return f"{ip}/{ip.max_prefixlen}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _forward_head(request: _Request, origin: str, host_header: str) -> bytes:
    """The request head for the upstream: origin-form, our Host, no hop-by-hop headers, and one
    request per connection."""
    drop = set(_HOP_BY_HOP)
    for name, value in request.headers:
        if name.lower() in ("connection", "proxy-connection"):
            drop.update(v.strip().lower() for v in value.split(","))
    lines = [f"{request.method} {origin} {request.version}", f"Host: {host_header}"]
    lines += [f"{name}: {value}" for name, value in request.headers if name.lower() not in drop]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    reason: str,
    body: str | bytes,
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    data = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(OSError):
        writer.write(head.encode() + data)
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Copy until EOF, then pass the EOF on (half-close). drain() bounds what is buffered.
    False if either side broke."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return True
    except OSError:
        return False


def _closing_response_head(head: bytes) -> bytes:
    """The response head with `Connection: close`: the client must not send a second request on a
    connection that the proxy ends after this response."""
    lines = head[:-4].split(b"\r\n")
    drop = {b"connection", b"keep-alive", b"proxy-connection"}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection":
            drop.update(v.strip().lower() for v in value.split(b","))
    kept = [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in drop]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n"


async def _pipe_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """`_pipe` for a forwarded request: the final response head gets `Connection: close`."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1."):
                writer.write(head)  # not HTTP: not ours to fix, relay it as it is
                break
            interim = head[9:10] == b"1" and head[9:12] != b"101"  # 100 Continue, 103 Early Hints...
            writer.write(head if interim else _closing_response_head(head))
            if not interim:
                break
    except asyncio.IncompleteReadError as e:
        writer.write(e.partial)
    except asyncio.LimitOverrunError:
        return False  # a response head past 64 KiB: end the connection rather than relay it unfixed
    except OSError:
        return False
    return await _pipe(reader, writer)


async def _relay(
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    forward: bool,
) -> None:
    """Bytes both ways. A tunnel ends when both directions have ended; a forwarded request when
    its response has (the client may still hold its side open, waiting for the next response)."""
    down = asyncio.create_task((_pipe_response if forward else _pipe)(upstream[0], client[1]))
    up = asyncio.create_task(_pipe(client[0], upstream[1]))
    pending: set[asyncio.Task[bool]] = {down, up}
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            # A broken side ends both directions.
            if any(not t.result() for t in done) or (forward and down in done):
                break
    finally:
        for t in (down, up):
            t.cancel()
        await asyncio.gather(down, up, return_exceptions=True)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class EgressProxy:
    """One unix socket per app; see the module doc. `log(app, message)` goes to the app's logs.
    `allow`: the internal ranges the operator opens to apps that list them (`--egress-allow`).
    `gateway` None: `{app}.osless` is refused (builds reach no app). `call`: how a function call
    of one app by another goes out (None: refused)."""

    def __init__(
        self,
        *,
        gateway: tuple[str, int] | None,
        log: Callable[[str, str], None],
        allow: Iterable[Network] = (),
        call: CallFunction | None = None,
    ) -> None:
        self.gateway = gateway
        self.call = call
        self.log = log
        self.policy = AddressPolicy(allow)
        self.calls: Counter[tuple[str, str]] = Counter()  # (caller, callee) -> requests: who calls whom
        self._calling: Counter[str] = Counter()  # app -> its function calls under way
        self._apps: dict[str, _Served] = {}

    async def add_app(self, app: str, socket_path: Path, allowed: list[str]) -> None:
        """Serve `app` on `socket_path`; if it is already served, take the new allowlist (and the
        new path, if it moved). Raises ValueError on an entry that is not a host, *.domain or IP."""
        allowlist = _Allowlist(allowed)
        served = self._apps.get(app)
        if served is not None and served.path == Path(socket_path):
            served.allowed = allowlist  # read per request: open tunnels keep what they were given
            return
        if served is not None:
            await self.remove_app(app)
        served = _Served(app, Path(socket_path), allowlist)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Python 3.11's start_server callback calls exception() on this task, which raises if
            # the task ended cancelled: remove_app's cancel must end it normally.
            with contextlib.suppress(asyncio.CancelledError):
                await self._handle(served, reader, writer)

        # The reader's limit is also the limit on the request head (readuntil).
        served.server = await asyncio.start_unix_server(handle, path=str(socket_path), limit=HEAD_LIMIT)
        self._apps[app] = served

    async def remove_app(self, app: str) -> None:
        """Stop serving `app`: close its socket (and remove the file) and its open connections."""
        served = self._apps.pop(app, None)
        if served is None:
            return
        served.removed = True
        if served.server is not None:
            served.server.close()
        tasks = list(served.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if served.server is not None:
            await served.server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            served.path.unlink()

    async def close(self) -> None:
        for app in list(self._apps):
            await self.remove_app(app)

    async def _handle(
        self, served: _Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        crowded = len(served.tasks) >= MAX_CONNECTIONS_PER_APP
        served.tasks.add(task)
        try:
            if crowded:  # before a byte is read: a connection that says nothing still holds a socket
                self.log(served.app, f"egress refused: {MAX_CONNECTIONS_PER_APP} connections open already")
                message = (
                    f"osless egress: app {served.app} has {MAX_CONNECTIONS_PER_APP} connections open, the "
                    "most it may have on a node; close some, or reuse them (keep-alive, a pool)\n"
                )
                await _respond(writer, 429, "Too Many Requests", message)
            # Accepted just before remove_app, started just after: the app is gone all the same.
            elif not served.removed:
                await self._serve(served, reader, writer)
        except OSError:
            pass  # the client went away: nothing to answer
        finally:
            served.tasks.discard(task)
            await _close(writer)

    async def _serve(
        self, served: _Served, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            await _respond(
                writer, 431, "Request Header Fields Too Large", "osless egress: request head too large\n"
            )
            return
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                await _respond(writer, 400, "Bad Request", "osless egress: incomplete request head\n")
            return
        except TimeoutError:
            return
        try:
            request = _parse_head(head)
            if request.method == "CONNECT":
                host, port = _split_authority(request.target, None)
                origin = ""
            else:
                host, port, origin = _split_absolute(request.target)
        except _BadRequest as e:
            await _respond(writer, 400, "Bad Request", f"osless egress: bad request: {e}\n")
            return

        app = served.app
        where = _hostport(host, port)
        if host.endswith(OSLESS_SUFFIX):
            target = host[: -len(OSLESS_SUFFIX)]
            if request.method == "CONNECT":
                await _respond(
                    writer,
                    400,
                    "Bad Request",
                    f"osless egress: reach osless apps over plain http://{host}/\n",
                )
                return
            if self.gateway is None:
                self.log(app, f"egress to {where} refused: no osless app is reachable from here")
                await _respond(
                    writer, 403, "Forbidden", f"osless egress: {host} is not reachable from here\n"
                )
                return
            if not NAME_RE.fullmatch(target):
                await _respond(
                    writer, 400, "Bad Request", f"osless egress: {host} is not an osless app name\n"
                )
                return
            path = origin.split("?", 1)[0]
            if path.startswith(PLATFORM_PATH):
                await self._call(served, reader, writer, request, target, path)
                return
            try:
                # The platform's own gateway: a fixed target of the platform's choosing, not the app's.
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    upstream = await asyncio.open_connection(*self.gateway, limit=HEAD_LIMIT)
            except (OSError, TimeoutError) as e:
                await self._fail(writer, app, where, e)
                return
            self.log(app, f"egress to {where}")
            self.calls[(app, target)] += 1
            head = _forward_head(request, origin, f"{target}.{GATEWAY_DOMAIN}")
            await self._tunnel(reader, writer, upstream, head, forward=True)
            return

        if not served.allowed.allows(host):
            self.log(app, f"egress to {where} refused: not in App(egress=[...])")
            body = (
                f"osless egress: {host} is not allowed for app {app}; "
                f'declare it with App("{app}", egress=["{host}"])'
            )
            ip = _ip(host)
            if ip is not None and (why := self.policy.refusal(ip)) is not None:
                body += f"; it is also {why}, which {_OPERATOR} {_single(host)}"
            await _respond(writer, 403, "Forbidden", body + "\n")
            return
        try:
            upstream = await self._open(host, port)
        except _Refused as e:
            self.log(app, f"egress to {where} refused: {e}")
            await _respond(
                writer, 403, "Forbidden", f"osless egress: {host} is not allowed for app {app}: {e}\n"
            )
            return
        except (OSError, TimeoutError) as e:
            await self._fail(writer, app, where, e)
            return
        self.log(app, f"egress to {where}")
        if request.method == "CONNECT":
            await self._tunnel(
                reader, writer, upstream, b"HTTP/1.1 200 Connection established\r\n\r\n", forward=False
            )
        else:
            host_header = where if port != 80 else (f"[{host}]" if ":" in host else host)
            head = _forward_head(request, origin, host_header)
            await self._tunnel(reader, writer, upstream, head, forward=True)

    async def _call(
        self,
        served: _Served,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: _Request,
        target: str,
        path: str,
    ) -> None:
        """`POST http://{target}.osless/__osless__/functions/{fn}`: a function call as `served.app`."""
        found = CALL_PATH.fullmatch(path)
        sending = SEND_PATH.fullmatch(path)
        if (found is None and sending is None) or request.method != "POST":
            await _respond(
                writer,
                404,
                "Not Found",
                f"osless egress: paths under {PLATFORM_PATH} are the platform's; call a function with "
                f"POST http://{target}.osless/__osless__/functions/NAME (osless.function)\n",
            )
            return
        if self.call is None:
            await _respond(writer, 403, "Forbidden", "osless egress: no function is callable from here\n")
            return
        headers = {name.lower(): value for name, value in request.headers}
        length = headers.get("content-length", "0")
        if not _DIGITS.fullmatch(length) or "transfer-encoding" in headers:  # one framing, known first
            await _respond(
                writer, 411, "Length Required", "osless egress: send the event with a Content-Length\n"
            )
            return
        if int(length) > CALL_BODY_LIMIT:
            await _respond(
                writer,
                413,
                "Content Too Large",
                f"osless egress: the event is past the limit of {CALL_BODY_LIMIT} bytes\n",
            )
            return
        app = served.app
        if self._calling[app] >= MAX_CALLS_PER_APP:  # before its event is read: nothing held for it
            message = (
                f"app {app} has {MAX_CALLS_PER_APP} function calls under way, the most it may have; "
                "retry once one has ended"
            )
            refusal = json.dumps({"error": {"code": "too_many_calls", "message": message}})
            await _respond(writer, 429, "Too Many Requests", refusal, "application/json")
            return
        self._calling[app] += 1
        try:
            try:
                body = await asyncio.wait_for(reader.readexactly(int(length)), HEAD_TIMEOUT_S)
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            function = found.group(1) if found is not None else f"queue:{sending.group(1) if sending else ''}"
            self.log(app, f"call of {target}.{function}")
            self.calls[(app, target)] += 1
            # It goes on in headers to the API: visible ASCII only (httpx could not send the rest).
            rid = headers.get("x-osless-request-id", "")[:64]
            trace = headers.get("traceparent", "")  # the calling span: passed on only if well formed
            status, content_type, answer = await self.call(
                app,
                target,
                function,
                body,
                rid if _REQUEST_ID.fullmatch(rid) else "",
                trace if traceparent.valid(trace.encode("latin-1", "replace")) else "",
            )
            await _respond(writer, status, _reason(status), answer, content_type)
        finally:
            self._calling[app] -= 1
            if not self._calling[app]:
                del self._calling[app]

    async def _fail(self, writer: asyncio.StreamWriter, app: str, where: str, error: BaseException) -> None:
        reason = "timed out" if isinstance(error, TimeoutError) else str(error) or type(error).__name__
        self.log(app, f"egress to {where} failed: {reason}")
        await _respond(writer, 502, "Bad Gateway", f"osless egress: cannot connect to {where}: {reason}\n")

    async def _tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        first: bytes,
        *,
        forward: bool,
    ) -> None:
        """Send `first` (the rewritten head upstream if `forward`, else the 200 to the client), relay."""
        try:
            (upstream[1] if forward else writer).write(first)
            await _relay((reader, writer), upstream, forward=forward)
        finally:
            await _close(upstream[1])

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve once, keep the addresses the operator's rules allow, connect to the first that
        answers, in the resolver's order. The socket connects to the very address checked: the name
        is never resolved again, which leaves no room for DNS rebinding."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            usable: list[tuple[int, tuple[Any, ...]]] = []
            refused: list[tuple[str, str]] = []
            for family, _, _, _, sockaddr in infos:
                address = str(sockaddr[0])
                why = self.policy.refusal(address)
                if why is None:
                    if (family, sockaddr) not in usable:
                        usable.append((family, sockaddr))
                else:
                    refused.append((address, why))
            if not usable:
                if not refused:
                    raise OSError(f"{host} has no address")
                address, why = refused[0]
                said = f"it is {why}" if address == host else f"it resolves to {address}, {why}"
                raise _Refused(f"{said}, which {_OPERATOR} {_single(address)}")
            error: OSError | None = None
            for kind, sockaddr in usable:
                sock = socket.socket(kind, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, sockaddr)
                    return await asyncio.open_connection(sock=sock, limit=HEAD_LIMIT)
                except OSError as e:
                    sock.close()
                    error = e
                except BaseException:
                    sock.close()
                    raise
            assert error is not None
            raise error
