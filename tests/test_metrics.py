"""`GET /metrics` on the node and the API: scraped and parsed with prometheus-client's own parser."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


def scrape(url: str, token: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def node_api(platform: Platform) -> str:
    (node,) = platform.http("GET", "/v1/nodes").json()["items"]
    url: str = node["api"]
    return url


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_node_counts_the_requests_it_answered(platform: Platform, hello: dict[str, Any]) -> None:
    url = node_api(platform)
    before = scrape(url, platform.token)
    for _ in range(5):
        assert httpx.get(f"{platform.gateway}/hello/").status_code == 200
    for _ in range(3):
        assert httpx.get(f"{platform.gateway}/hello/nosuch").status_code == 404
    for _ in range(2):
        assert platform.invoke("hello", "greet", {"name": "m"})[0] == 200

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        now = scrape(url, platform.token)
        web_2xx = value(now, "osless_requests_total", app="hello", function="web", code="2xx")
        return (
            now
            if web_2xx - value(before, "osless_requests_total", app="hello", function="web", code="2xx") >= 5
            and value(now, "osless_requests_total", app="hello", function="greet", code="2xx")
            - value(before, "osless_requests_total", app="hello", function="greet", code="2xx")
            >= 2
            # Each gateway process sends its figures once a second: the 404s may come a second later.
            and value(now, "osless_requests_total", app="hello", function="web", code="4xx")
            - value(before, "osless_requests_total", app="hello", function="web", code="4xx")
            >= 3
            else None
        )

    after = platform.wait_for(counted, timeout=10, what="the requests counted")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("osless_requests_total", app="hello", function="web", code="2xx") == 5
    assert delta("osless_requests_total", app="hello", function="web", code="4xx") == 3
    assert delta("osless_requests_total", app="hello", function="greet", code="2xx") == 2
    assert delta("osless_request_duration_seconds_count", app="hello", function="web") == 8
    assert delta("osless_request_duration_seconds_bucket", app="hello", function="web", le="+Inf") == 8
    assert delta("osless_request_duration_seconds_sum", app="hello", function="web") > 0
    # The instance that serves them was started, and timed; it runs, and the kernel counts it.
    assert value(after, "osless_cold_start_seconds_count", app="hello") >= 1
    assert value(after, "osless_instances", app="hello", phase="ready") >= 1
    assert value(after, "osless_memory_bytes", app="hello") > 0
    assert value(after, "osless_cpu_seconds_total", app="hello") > 0
    assert value(after, "osless_gateway_processes") >= 1
    # No path in a label: the 404s' path is nowhere.
    assert not any("nosuch" in str(key) for key in after)


def test_metrics_need_a_token_that_may_read_the_platform(platform: Platform, hello: dict[str, Any]) -> None:
    url = node_api(platform)
    assert httpx.get(f"{url}/metrics").status_code == 401
    invoker = platform.cli_json("tokens", "create", "--role", "invoke", "--name", "metrics-invoker")["token"]
    r = httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {invoker}"})
    assert r.status_code == 403 and "'read'" in r.json()["error"]["message"]
    reader = platform.cli_json("tokens", "create", "--role", "read", "--name", "metrics-reader")["token"]
    assert (
        "osless_requests_total"
        in httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {reader}"}).text
    )


def test_the_api_serves_the_platform_and_its_store(platform: Platform, hello: dict[str, Any]) -> None:
    samples = scrape(platform.api, platform.token)
    assert value(samples, "osless_instances", app="hello", phase="ready") >= 1
    assert value(samples, "osless_nodes") == 1
    assert value(samples, "osless_store_operation_duration_seconds_count", op="get") > 0
    assert any(name == "osless_store_operation_duration_seconds_bucket" for name, _ in samples)
    # The API's watches see its own writes (instances' status, heartbeats): the lag is measured.
    assert value(samples, "osless_store_watch_lag_seconds_count") > 0
    assert ("osless_builds", (("status", "queued"),)) in samples
    assert httpx.get(f"{platform.api}/metrics").status_code == 401
    invoker = platform.cli_json("tokens", "create", "--role", "invoke", "--name", "metrics-invoker2")["token"]
    r = httpx.get(f"{platform.api}/metrics", headers={"authorization": f"Bearer {invoker}"})
    assert r.status_code == 403 and "'read'" in r.json()["error"]["message"]


def test_usage_counts_an_app_s_invocations_per_function_and_hour(
    platform: Platform, hello: dict[str, Any]
) -> None:
    def invocations() -> float:
        found = platform.cli_json("usage", "hello", "--since", "2h")
        return float(found["functions"].get("greet", {}).get("invocations", 0))

    before = invocations()
    for _ in range(3):
        assert platform.invoke("hello", "greet", {"name": "u"})[0] == 200
    platform.wait_for(lambda: invocations() - before >= 3, timeout=10, what="3 more invocations in the usage")
    # At least ours: the shared platform's other tests call hello.greet too, and a node's minute so far
    # may land after `before` was read.
    assert invocations() - before >= 3
    found = platform.cli_json("usage", "hello", "--since", "2h")
    (hour, *_) = [h for h in found["hours"] if "greet" in h["functions"]]
    assert hour["hour"] % 3600 == 0 and hour["functions"]["greet"]["duration_s"] > 0
    # Measured by the kernel: the instance used CPU and memory, and was started.
    platform.wait_for(
        lambda: (t := platform.cli_json("usage", "hello")["totals"])["cpu_s"] > 0 and t["gb_s"] > 0,
        timeout=10,
        what="CPU and GB-seconds",
    )
    text = platform.cli("usage", "hello").stdout
    assert "greet" in text and "total" in text
    r = platform.cli("usage", "hello", "--since", "forever", check=False)
    assert r.returncode == 1 and "24h" in r.stderr


def test_top_lists_the_app_and_its_instances(platform: Platform, hello: dict[str, Any]) -> None:
    for _ in range(3):
        assert httpx.get(f"{platform.gateway}/hello/").status_code == 200
    # Their latencies reach `top` with the node's next report (each second, its gateways' figures
    # as of the second before): the last 10 s may hold no other request of hello's.
    view = platform.wait_for(
        lambda: (v := platform.cli_json("top"))["apps"]["hello"]["p50_ms"] is not None and v,
        timeout=15,
        what="hello's latencies in osless top",
    )
    app = view["apps"]["hello"]
    assert app["instances"] >= 1 and app["memory"] > 0
    assert app["p50_ms"] is not None and app["p99_ms"] >= app["p50_ms"]
    (inst, *_) = [i for i in view["instances"] if i["app"] == "hello"]
    assert inst["node"] and inst["phase"] == "ready"


def test_an_app_s_own_metrics_are_served_under_its_name(platform: Platform) -> None:
    platform.deploy(APPS / "promapp")
    try:
        for kind in ("big", "big", "small"):
            assert platform.invoke("promapp", "order", {"kind": kind})[0] == 200
        (inst,) = platform.instances("promapp")
        r = httpx.get(
            f"{node_api(platform)}/metrics/apps/promapp",
            headers={"authorization": f"Bearer {platform.token}"},
        )
        assert r.status_code == 200, r.text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }
        assert samples[("shop_orders_total", (("kind", "big"), ("osless_instance", inst["id"])))] == 2
        assert samples[("shop_orders_total", (("kind", "small"), ("osless_instance", inst["id"])))] == 1
        assert samples[("osless_app_scrape_errors", ())] == 0
        # A huge answer (90k samples) is parsed off the node's loop: its API (and agent) answer meanwhile.
        assert platform.invoke("promapp", "flood", {"n": 90_000})[0] == 200
        stalls = []
        scrape = threading.Thread(
            target=httpx.get,
            args=(f"{node_api(platform)}/metrics/apps/promapp",),
            kwargs={"headers": {"authorization": f"Bearer {platform.token}"}, "timeout": 60},
        )
        began = time.monotonic()
        scrape.start()
        while scrape.is_alive():
            at = time.monotonic()
            assert httpx.get(f"{node_api(platform)}/healthz", timeout=30).status_code == 200
            stalls.append(time.monotonic() - at)
            time.sleep(0.05)
        took = time.monotonic() - began
        # The node kept answering while it parsed (its parse is in a thread; how long one probe waits
        # for the GIL meanwhile depends on the machine's load, so it is not asserted here).
        assert took > 1 and stalls, (took, stalls)
        # Apart from the platform's: an app's names never reach the node's own /metrics.
        assert (
            "shop_orders"
            not in httpx.get(
                f"{node_api(platform)}/metrics", headers={"authorization": f"Bearer {platform.token}"}
            ).text
        )
    finally:
        platform.http("DELETE", "/v1/apps/promapp")


def test_a_node_reports_usage_only_of_the_apps_placed_on_it(
    platform: Platform, hello: dict[str, Any]
) -> None:
    def put(node: str, function: str, n: float) -> httpx.Response:
        made = platform.http("POST", "/v1/tokens", json={"role": "node", "name": node})
        assert made.status_code == 201, made.text
        hour = int(time.time() // 3600 * 3600)
        row = {"hour": hour, "app": "hello", "function": function, "invocations": n, "gb_s": n}
        live = {"apps": {"hello": {"requests_per_s": n}}, "at": time.time()}
        return httpx.put(
            f"{platform.api}/v1/nodes/{node}/usage",
            json={"now": live, "usage": [row], "pending": [row]},
            headers={"authorization": f"Bearer {made.json()['token']}"},
            timeout=30,
        )

    # A node that never ran hello (one taken over, say) cannot bill it nor fill its `osless top`.
    r = put("usage-elsewhere", "forged", 1e6)
    assert r.status_code == 200 and r.json() == {"rows": 0}, r.text
    assert platform.http("GET", "/v1/top").json()["apps"]["hello"]["requests_per_s"] < 1e6
    found = platform.http("GET", "/v1/apps/hello/usage").json()
    assert "forged" not in found["functions"] and found["totals"]["gb_s"] < 1e6, found
    # Its own node's rows are taken.
    (node,) = [n["name"] for n in platform.http("GET", "/v1/nodes").json()["items"]]
    r = put(node, "placed_probe", 1)
    assert r.status_code == 200 and r.json() == {"rows": 1}, r.text


def test_top_counts_4xx_apart_from_5xx(platform: Platform, hello: dict[str, Any]) -> None:
    """The dashboard's request chart splits answers by status class: 4xx are not errors of the app."""

    def client_errors() -> dict[str, Any] | None:
        for _ in range(5):
            assert httpx.get(f"{platform.gateway}/hello/no-such-page").status_code == 404
        app = platform.http("GET", "/v1/top").json()["apps"]["hello"]
        return app if app["client_errors_per_s"] > 0 else None

    app = platform.wait_for(client_errors, timeout=15, what="4xx answers counted in /v1/top")
    assert app["requests_per_s"] >= app["client_errors_per_s"]
