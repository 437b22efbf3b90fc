"""What a node says of where it is, tied to where its connection comes from.

The API dials a node's API (its logs) with a reader token, gateways dial its relay, and a server with
no node of its own sends function calls to its gateway: a node taken over could otherwise point them
at anything (the API's own loopback services, a cloud's metadata address, another node). So a
heartbeat's address is the address its connection comes from (`request.client.host`: nodes bind their
client to their `--host`), and each URL it reports is on that address: http(s), a port, no userinfo,
no path. A wildcard host (`0.0.0.0`, `::`: a node listening everywhere) stands for that address.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

from osless.api.errors import ApiError
from osless.contracts import NodeLease

__all__ = ["tie_to_client"]

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(text: str) -> IpAddress | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _host(ip: IpAddress) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _refuse(what: str, why: str) -> ApiError:
    return ApiError(
        400,
        "bad_node_address",
        f"the node's {what} {why}: a node reports URLs on the address it connects to the API from "
        "(`osless node join --host ADDR`, an IP address of this node)",
    )


def _on_client(what: str, host: str | None, client: IpAddress) -> None:
    ip = _ip(host or "")
    if ip is None:
        raise _refuse(what, f"has host {str(host)[:100]!r}, not an IP address")
    if not ip.is_unspecified and ip != client:
        raise _refuse(what, f"is on {ip}, but the node connects from {client}")


def _port(what: str, parts: SplitResult) -> int:
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None or not 1 <= port <= 65535:
        raise _refuse(what, "names no port from 1 to 65535")
    return port


def _split(what: str, url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError:  # a bracketed host that is no IPv6 address: "[0]:0"
        raise _refuse(what, "is not a URL") from None


def _url(what: str, url: str, client: IpAddress) -> str:
    parts = _split(what, url)
    if parts.scheme not in ("http", "https"):
        raise _refuse(what, f"has scheme {parts.scheme[:20]!r}: http or https only")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _refuse(what, "holds userinfo")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _refuse(what, "has a path, query or fragment: an origin only")
    _on_client(what, parts.hostname, client)
    return f"{parts.scheme}://{_host(client)}:{_port(what, parts)}"


def _relay(relay: str, client: IpAddress) -> str:
    parts = _split("relay", f"//{relay}")
    if parts.username is not None or "@" in parts.netloc or parts.path or parts.query or parts.fragment:
        raise _refuse("relay", "is not host:port")
    _on_client("relay", parts.hostname, client)
    return f"{_host(client)}:{_port('relay', parts)}"


def tie_to_client(lease: NodeLease, client: str | None) -> NodeLease:
    """The lease with its address the client's and each URL checked to be on it (a wildcard host
    written as the client's address); ApiError 400 saying which is not."""
    ip = _ip(client or "")
    if ip is None:
        raise ApiError(400, "bad_node_address", "the API cannot tell the address this heartbeat comes from")
    if lease.address is not None:
        _on_client("address", lease.address, ip)
    return lease.model_copy(
        update={
            "address": str(ip),
            "gateway": _url("gateway URL", lease.gateway, ip) if lease.gateway is not None else None,
            "api": _url("API URL", lease.api, ip) if lease.api is not None else None,
            "relay": _relay(lease.relay, ip) if lease.relay is not None else None,
        }
    )
