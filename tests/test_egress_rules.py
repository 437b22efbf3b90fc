"""The addresses egress refuses whatever an app lists: internal ranges, their other spellings, this
host's own addresses (read from the kernel, and again when they change), and the operator's ranges."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest

from osless.node.egress_rules import AddressPolicy, HostAddresses, parse_networks, read_host_networks

REFUSED = {
    "10.1.2.3": "a private address (10.0.0.0/8)",
    "172.16.0.1": "a private address (172.16.0.0/12)",
    "172.31.255.254": "a private address (172.16.0.0/12)",
    "192.168.1.1": "a private address (192.168.0.0/16)",
    "100.64.0.1": "a carrier-grade NAT address (100.64.0.0/10)",
    "169.254.169.254": "a link-local address, where cloud metadata services live (169.254.0.0/16)",
    "0.0.0.0": "an unspecified address, which connects to this host (0.0.0.0/8)",
    "192.0.0.170": "an IETF protocol address (192.0.0.0/24)",
    "224.0.0.1": "a multicast address (224.0.0.0/4)",
    "239.255.255.250": "a multicast address (224.0.0.0/4)",
    "240.0.0.1": "a reserved or broadcast address (240.0.0.0/4)",
    "255.255.255.255": "a reserved or broadcast address (240.0.0.0/4)",
    "::": "an unspecified, loopback or IPv4-compatible address (::/96)",
    "::10.1.2.3": "an unspecified, loopback or IPv4-compatible address (::/96)",
    "::ffff:0:a01:203": "an IPv4-translated address (::ffff:0:0:0/96)",
    "100::1": "a discard-only address (100::/64)",
    "fc00::1": "a unique local (private) address (fc00::/7)",
    "fd12:3456::1": "a unique local (private) address (fc00::/7)",
    "fe80::1": "a link-local address (fe80::/10)",
    "fe80::1%1": "a link-local address (fe80::/10)",
    "fec0::1": "a site-local address (fec0::/10)",
    "ff02::1": "a multicast address (ff00::/8)",
    # Other spellings of internal IPv4 addresses: mapped, 6to4, NAT64 (both prefixes), Teredo.
    "::ffff:10.1.2.3": "a private address (10.0.0.0/8)",
    "::ffff:169.254.169.254": "a link-local address, where cloud metadata services live (169.254.0.0/16)",
    "2002:a01:203::1": "a private address (10.1.2.3, in 10.0.0.0/8)",
    "64:ff9b::a01:203": "a private address (10.1.2.3, in 10.0.0.0/8)",
    "64:ff9b::a9fe:a9fe": (
        "a link-local address, where cloud metadata services live (169.254.169.254, in 169.254.0.0/16)"
    ),
    "64:ff9b:1::c0a8:101": "a private address (192.168.1.1, in 192.168.0.0/16)",
    "2001:0:4136:e378:8000:63bf:f5fe:fdfc": "a private address (10.1.2.3, in 10.0.0.0/8)",  # Teredo client
}

# Public, documentation and benchmarking addresses stay open: services sit there (on this machine the
# package index itself resolves into 203.0.113.0/24), and ipaddress's is_private would refuse them.
OPEN = [
    "8.8.8.8",
    "1.1.1.1",
    "203.0.113.80",
    "198.51.100.7",
    "198.18.0.1",
    "172.32.0.1",
    "100.128.0.1",
    "2606:4700::1111",
    "2001:db8::1",
    "64:ff9b::808:808",
    "2002:808:808::1",
    "::ffff:8.8.8.8",
]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_internal_addresses_are_refused_in_every_spelling_and_public_ones_are_not() -> None:
    policy = AddressPolicy()
    for address, why in REFUSED.items():
        assert policy.refusal(address) == why, address
    for address in OPEN:
        assert address not in policy.host
        assert policy.refusal(address) is None, address


def test_every_address_of_this_host_is_refused_and_a_range_never_opens_one() -> None:
    addresses = [
        info["local"]
        for link in json.loads(_ip("-j", "addr"))
        for info in link.get("addr_info", [])
        if "local" in info
    ]
    assert "127.0.0.1" in addresses and len(addresses) > 2
    everything = parse_networks(["0.0.0.0/0", "::/0"])
    for address in addresses:
        assert AddressPolicy().refusal(address) == "an address of this host", address
        assert AddressPolicy(everything).refusal(address) == "an address of this host", address
        assert AddressPolicy(parse_networks([address])).refusal(address) is None, address
    # ...and all of 127.0.0.0/8, which the kernel delivers here as a whole.
    assert AddressPolicy().refusal("127.45.6.7") == "an address of this host"
    assert AddressPolicy().refusal("::ffff:127.0.0.1") == "an address of this host"


def test_the_operators_ranges_open_internal_addresses_and_only_those() -> None:
    policy = AddressPolicy(parse_networks(["10.20.0.0/16", "fd12::/16"]))
    assert policy.refusal("10.20.3.4") is None
    assert policy.refusal("::ffff:10.20.3.4") is None
    assert policy.refusal("fd12:3456::1") is None
    assert policy.refusal("10.21.0.1") == "a private address (10.0.0.0/8)"
    assert policy.refusal("192.168.1.1") == "a private address (192.168.0.0/16)"


def test_a_bad_range_is_refused_with_what_to_write() -> None:
    assert [str(n) for n in parse_networks(["10.1.2.3", " 10.1.0.0/16", "fd00::/8"])] == [
        "10.1.2.3/32",
        "10.1.0.0/16",
        "fd00::/8",
    ]
    with pytest.raises(ValueError, match=r"expected an address or a CIDR range \(the range is 10.1.2.0/24\)"):
        parse_networks(["10.1.2.3/24"])
    with pytest.raises(ValueError, match=r"'nope': expected an address or a CIDR range$"):
        parse_networks(["nope"])


def test_an_address_added_to_this_host_is_refused_once_read_again() -> None:
    used = _ip("-4", "-o", "addr")
    n = next(n for n in random.sample(range(1, 255), 254) if f"10.214.{n}." not in used)
    v4, v6 = f"10.214.{n}.1", f"fd99:214:{n:x}::1"
    link, peer = f"osegr{os.getpid()}", f"osegq{os.getpid()}"
    host = HostAddresses(refresh_s=0.2)
    policy = AddressPolicy(parse_networks(["10.214.0.0/16", "fd99::/16"]), host=host)
    assert policy.refusal(v4) is None and policy.refusal(v6) is None
    _ip("link", "add", link, "type", "veth", "peer", "name", peer)
    try:
        _ip("addr", "add", f"{v4}/24", "dev", link)
        _ip("addr", "add", f"{v6}/64", "dev", link, "nodad")
        _ip("link", "set", link, "up")
        networks = {str(net) for net in read_host_networks()}
        assert f"{v4}/32" in networks and f"{v6}/128" in networks
        time.sleep(0.3)
        assert policy.refusal(v4) == "an address of this host"
        assert policy.refusal(v6) == "an address of this host"
    finally:
        subprocess.run(["ip", "link", "del", link], capture_output=True)
    time.sleep(0.3)
    assert policy.refusal(v4) is None
