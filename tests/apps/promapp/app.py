"""An app with metrics of its own (prometheus-client's default registry), for the node to serve."""

from prometheus_client import Counter

import osless

app = osless.App("promapp")
ORDERS = Counter("shop_orders", "Orders taken", ["kind"])


@app.function()
def order(event, ctx):
    ORDERS.labels(kind=str((event or {}).get("kind", "plain"))).inc()
    return {"ok": True}


class _Flood:
    """A hostile app's metrics: `n` samples made at each scrape (for the node to parse)."""

    n = 0

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("shop_flood", "Many series", labels=["k"])
        for i in range(self.n):
            family.add_metric([f"{i:08d}"], i)
        yield family


_FLOOD = _Flood()


@app.function()
def flood(event, ctx):
    from prometheus_client import REGISTRY

    if not _FLOOD.n:
        REGISTRY.register(_FLOOD)
    _FLOOD.n = int(event["n"])
    return {"ok": True}
