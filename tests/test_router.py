"""gateway.router: which ready instance takes a request. The table is fed here as the watches feed
it (apps, instances, nodes, read into their contracts), without an API behind it."""

from __future__ import annotations

import asyncio

from osless.client import AsyncApi
from osless.contracts import App, ImageManifest, Instance, InstanceStatus, Node
from osless.gateway.router import Router, Timeouts, web_timeouts
from tests.test_images import manifest_fields

IMAGE = "0" * 64


def _instance(iid: str, node: str) -> Instance:
    status = InstanceStatus(
        phase="ready", pid=100, uid=1000, socket=f"/run/{iid}.web", control=f"/run/{iid}.ctl"
    )
    return Instance(id=iid, app="a", release=1, image=IMAGE, node=node, status=status)


def test_instances_behind_a_relay_marked_down_are_passed_over_while_another_can_take_it() -> None:
    async def main() -> None:
        api = AsyncApi("http://127.0.0.1:9", "osl_unused")
        router = Router(api, node="n1", token="osl_gateway")
        router.apps.items["a"] = App(name="a", current_release=1)
        # Read from the API by a live router.
        router._manifests[("a", 1)] = ImageManifest.model_validate(manifest_fields(app="a"))
        for iid, node in (("a-2", "n2"), ("a-3", "n3")):
            router.instances.items[iid] = _instance(iid, node)
        for name, port in (("n2", 7002), ("n3", 7003)):
            router.nodes.items[name] = Node(name=name, relay=f"127.0.0.1:{port}")
        try:
            await router._nodes_changed()
            assert {router.pick_now("a").id for _ in range(40)} == {"a-2", "a-3"}  # type: ignore[union-attr]
            router.outliers.failed(("127.0.0.1", 7002), "refused")
            assert {router.pick_now("a").id for _ in range(40)} == {"a-3"}  # type: ignore[union-attr]
            # Every candidate marked: one is tried anyway, rather than none.
            router.outliers.failed(("127.0.0.1", 7003), "refused")
            assert router.pick_now("a") is not None
            # n2 announces another address (it came back): its mark is gone with the old one.
            del router.nodes.items["n2"]
            await router._nodes_changed()
            router.nodes.items["n2"] = Node(name="n2", relay="127.0.0.1:7012")
            await router._nodes_changed()
            assert {router.pick_now("a").id for _ in range(40)} == {"a-2"}  # type: ignore[union-attr]
        finally:
            await router.close()
            await api.aclose()

    asyncio.run(main())


def test_web_requests_to_http_functions_may_take_the_functions_timeout() -> None:
    def timeouts(functions: dict[str, object], web: object = None) -> Timeouts:
        return web_timeouts(ImageManifest.model_validate(manifest_fields(functions=functions, web=web)))

    slow = {"memory_mb": 256, "timeout_s": 300, "async": False}
    assert timeouts({"page": {**slow, "http": True}}) == Timeouts(301.0, 301.0)
    assert timeouts({"other": slow}) == Timeouts(60.0, 3600.0)  # not reached over HTTP: the defaults
    web = {"name": "web", "memory_mb": 256, "timeout_s": 10, "max_duration_s": 100}
    assert timeouts({"page": {**slow, "http": True}}, web) == Timeouts(301.0, 301.0)
    assert timeouts({"other": slow}, web) == Timeouts(10.0, 100.0)
