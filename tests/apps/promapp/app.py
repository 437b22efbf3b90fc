"""An app with metrics of its own (prometheus-client's default registry), for the node to serve."""

from prometheus_client import Counter

import osless

app = osless.App("promapp")
ORDERS = Counter("shop_orders", "Orders taken", ["kind"])


@app.function()
def order(event, ctx):
    ORDERS.labels(kind=str((event or {}).get("kind", "plain"))).inc()
    return {"ok": True}
