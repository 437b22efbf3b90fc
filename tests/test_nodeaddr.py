"""A node's heartbeat: its URLs are held to the address its connection comes from (no SSRF)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.platform import Platform


def _heartbeat(platform: Platform, token: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    source = kw.pop("source", None)
    transport = httpx.HTTPTransport(local_address=source) if source else None
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.put(
            f"{platform.api}/v1/nodes/addr-probe",
            json={"ttl_s": 300, **body},
            headers={"authorization": f"Bearer {token}", **kw.pop("headers", {})},
        )


def test_a_node_reports_urls_only_on_the_address_it_calls_from(own_platform: Platform) -> None:
    made = own_platform.http("POST", "/v1/tokens", json={"role": "node", "name": "addr-probe"})
    token = made.json()["token"]
    # From 127.0.0.1: nothing may point the API or the gateways elsewhere.
    for body in (
        {"api": "http://127.0.0.7:9000"},  # another address (another node, a service)
        {"api": "http://169.254.169.254:80"},  # a cloud's metadata service
        {"relay": "169.254.169.254:80"},
        {"relay": "127.0.0.1:0"},
        {"relay": "127.0.0.1:70000"},
        {"relay": "[0]:0"},  # brackets around no IPv6 address: urlsplit raises (was a 500)
        {"gateway": "http://[0]:8080"},
        {"api": "http://[0]:80"},
        {"gateway": "http://10.0.0.1:8080"},
        {"gateway": "http://localhost:8080"},  # a name could resolve anywhere, later
        {"gateway": "ftp://127.0.0.1:21"},
        {"gateway": "http://user:pw@127.0.0.1:8080"},
        {"gateway": "http://127.0.0.1:8080/admin"},
        {"gateway": "http://127.0.0.1"},  # no port
        {"address": "10.0.0.1"},
    ):
        r = _heartbeat(own_platform, token, body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["code"] == "bad_node_address", r.text
        assert "--host" in r.json()["error"]["message"], r.text
    # A local process cannot claim another address with a proxy's header.
    r = _heartbeat(
        own_platform, token, {"api": "http://127.0.0.7:9000"}, headers={"x-forwarded-for": "127.0.0.7"}
    )
    assert r.status_code == 400, r.text
    assert not [n for n in own_platform.http("GET", "/v1/nodes").json()["items"] if n["name"] == "addr-probe"]
    # From its own address, its own URLs; a wildcard host is where it connects from.
    r = _heartbeat(
        own_platform,
        token,
        {
            "address": "0.0.0.0",
            "api": "http://127.0.0.7:9000",
            "relay": "127.0.0.7:9001",
            "gateway": "http://0.0.0.0:8080",
        },
        source="127.0.0.7",
    )
    assert r.status_code == 200, r.text
    node = r.json()
    assert (node["address"], node["api"], node["relay"], node["gateway"]) == (
        "127.0.0.7",
        "http://127.0.0.7:9000",
        "127.0.0.7:9001",
        "http://127.0.0.7:8080",
    )
    own_platform.http("DELETE", "/v1/nodes/addr-probe")
