"""Which addresses the egress proxy refuses whatever an app lists: internal ranges and this host's own.

An app writes its own `App(egress=[...])`, so that list cannot be what keeps it out of the operator's
networks. Internal ranges (below) and every address of this host are refused unless the operator
allows them at `osless up --egress-allow CIDR`. This host's own addresses are where services that
trust local connections listen (the platform's API among them): a range does not open them, only an
entry that is the address itself (`ADDR/32`, `ADDR/128`).

Checked is an address, never a name: the proxy resolves a name once, checks each address, and
connects to the address it checked.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["AddressPolicy", "HostAddresses", "Network", "parse_networks"]

log = logging.getLogger("osless.node")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Written out rather than taken from ipaddress's is_private/is_global: those also cover the
# documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and benchmarking
# (198.18.0.0/15), where real services sit on test rigs and some private clouds: on some hosts
# the package index itself resolves there, and builds reach it through this proxy. What is listed
# here is where an operator's own machines live, or what reaches this host.
_INTERNAL_V4 = [
    ("0.0.0.0/8", "an unspecified address, which connects to this host"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a carrier-grade NAT address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address, where cloud metadata services live"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol address"),
    ("192.168.0.0/16", "a private address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved or broadcast address"),
]
_INTERNAL_V6 = [
    # ::, ::1 and the IPv4-compatible forms (::127.0.0.1). The IPv4-mapped form (::ffff:127.0.0.1)
    # is judged as the IPv4 address it connects to; NAT64 and 6to4 forms by the IPv4 inside them.
    ("::/96", "an unspecified, loopback or IPv4-compatible address"),
    ("::ffff:0:0:0/96", "an IPv4-translated address"),
    ("100::/64", "a discard-only address"),
    ("fc00::/7", "a unique local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
]
_RANGES: list[tuple[Network, str]] = [
    (ipaddress.ip_network(cidr), what) for cidr, what in _INTERNAL_V4 + _INTERNAL_V6
]
# NAT64: the well-known prefix and the local-use one (RFC 8215), the IPv4 address in the last 32 bits.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))

REFRESH_S = 5.0
_RTF_ANYCAST = 0x00100000
_RTF_LOCAL = 0x80000000


def parse_networks(cidrs: Iterable[str]) -> list[Network]:
    """`--egress-allow` values: `10.1.2.0/24`, `fd00::/8`, or one address. ValueError says what is wrong."""
    networks: list[Network] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip()))
        except ValueError as e:
            hint = ""
            with_host_bits = "has host bits set" in str(e)
            if with_host_bits:
                hint = f" (the range is {ipaddress.ip_network(cidr.strip(), strict=False)})"
            raise ValueError(f"--egress-allow {cidr!r}: expected an address or a CIDR range{hint}") from None
    return networks


def _embedded_v4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to through a translator: NAT64, 6to4, Teredo."""
    found: list[ipaddress.IPv4Address] = []
    if any(ip in prefix for prefix in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # the relay and the client
    return found


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""  # no IPv6 in this kernel, say


def _local_v4(fib_trie: str) -> set[Network]:
    """The LOCAL entries of /proc/net/fib_trie: each address of this host, and local ranges (127/8)."""
    found: set[Network] = set()
    leaf = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            leaf = text[3:].strip()
        elif text.startswith("+--"):
            leaf = ""
        elif text.startswith("/") and leaf and text.split()[-1] == "LOCAL":
            found.add(ipaddress.ip_network(f"{leaf}{text.split()[0]}", strict=False))
    return found


def _v6(hex32: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(int(hex32, 16))


def _local_v6(if_inet6: str, ipv6_route: str) -> set[Network]:
    """Each interface's addresses, and the routes the kernel delivers here (local and anycast)."""
    found: set[Network] = set()
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields:
            found.add(ipaddress.IPv6Network(_v6(fields[0])))
    for line in ipv6_route.splitlines():
        fields = line.split()
        if len(fields) >= 9 and int(fields[8], 16) & (_RTF_LOCAL | _RTF_ANYCAST):
            found.add(ipaddress.IPv6Network((_v6(fields[0]), int(fields[1], 16)), strict=False))
    return found


def read_host_networks() -> set[Network]:
    """Every address of this host (all interfaces, IPv4 and IPv6), from this network namespace's /proc."""
    v4 = _local_v4(_read("/proc/net/fib_trie"))
    v6 = _local_v6(_read("/proc/net/if_inet6"), _read("/proc/net/ipv6_route"))
    if not v4:
        log.warning("egress: cannot read this host's IPv4 addresses from /proc/net/fib_trie")
    return v4 | v6


class HostAddresses:
    """This host's addresses, read at start and again when asked `refresh_s` later: an address added
    later (a new interface, a VPN) is refused within seconds."""

    def __init__(self, refresh_s: float = REFRESH_S) -> None:
        self.refresh_s = refresh_s
        self._networks = read_host_networks()
        self._read_at = time.monotonic()

    def networks(self) -> set[Network]:
        if time.monotonic() - self._read_at > self.refresh_s:
            self._networks = read_host_networks()
            self._read_at = time.monotonic()
        return self._networks

    def __contains__(self, ip: object) -> bool:
        return isinstance(ip, Address) and any(ip in net for net in self.networks())


class AddressPolicy:
    """`refusal(address)`: why egress may not connect there, or None. `allow`: the operator's ranges."""

    def __init__(self, allow: Iterable[Network] = (), host: HostAddresses | None = None) -> None:
        self.allow = list(allow)
        # This host's own addresses open only to an entry that is the address itself.
        self._exact = {net.network_address for net in self.allow if net.num_addresses == 1}
        self.host = host if host is not None else HostAddresses()

    def refusal(self, address: str | Address) -> str | None:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        leads_to: list[Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            ip = ipaddress.IPv6Address(int(ip))  # without its %scope: the scope is not where it leads
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # the kernel connects to ::ffff:a.b.c.d over IPv4
                leads_to = [ip]
            else:
                leads_to = [ip, *_embedded_v4(ip)]
        if any(a in self.host for a in leads_to):
            return None if ip in self._exact else "an address of this host"
        for a in leads_to:
            for net, what in _RANGES:
                if a in net:
                    if any(ip in allowed for allowed in self.allow):
                        return None
                    return f"{what} ({net})" if a == ip else f"{what} ({a}, in {net})"
        return None
