"""The scheduler: every app runs `desired` instances of its current release, placed on live nodes.

A reconcile looks only at the present (apps, instances, nodes) and is safe to repeat. A release
change is a rollout: new instances are created first; the old release's instances are deleted only
once the new ones are ready, so a release that cannot start leaves the old one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from typing import Any

from osless.client import ApiError, AsyncApi, Informer

__all__ = ["Scheduler", "desired_instances"]

log = logging.getLogger("osless.scheduler")

RESYNC_S = 5.0
NODE_LOST_AFTER_S = 15.0


def desired_instances(app: dict[str, Any]) -> int:
    """How many instances the app should have now: the autoscaler's figure, within min and max."""
    if app.get("current_release") is None:
        return 0
    lo, hi = int(app["min"]), int(app["max"])
    wanted = app.get("desired")
    return min(hi, max(lo, lo if wanted is None else int(wanted)))


class Scheduler:
    def __init__(self, api: AsyncApi) -> None:
        self.api = api
        self._wake = asyncio.Event()
        self._orphaned_since: dict[str, float] = {}
        self.apps = Informer(api, "/v1/apps", key=lambda o: str(o["name"]), on_change=self._changed)
        self.instances = Informer(api, "/v1/instances", key=lambda o: str(o["id"]), on_change=self._changed)
        self.nodes = Informer(api, "/v1/nodes", key=lambda o: str(o["name"]), on_change=self._changed)

    async def _changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        informers = [asyncio.create_task(i.run()) for i in (self.apps, self.instances, self.nodes)]
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RESYNC_S)
                self._wake.clear()
                if all(i.synced.is_set() for i in (self.apps, self.instances, self.nodes)):
                    try:
                        await self.reconcile()
                    except ApiError as e:
                        log.warning("reconcile: %s", e.message)
                        self._wake.set()
                        await asyncio.sleep(0.2)
        finally:
            for t in informers:
                t.cancel()

    async def reconcile(self) -> None:
        apps = dict(self.apps.items)
        nodes = sorted(self.nodes.items)
        now = time.monotonic()
        # Instances on a node that stopped renewing its lease are gone: after a grace period (a
        # node restarting keeps its name) they are deleted, and the apps get new ones on live nodes.
        for inst in list(self.instances.items.values()):
            if inst["node"] in self.nodes.items:
                self._orphaned_since.pop(inst["id"], None)
            elif now - self._orphaned_since.setdefault(inst["id"], now) > NODE_LOST_AFTER_S:
                log.warning("node %s is gone: replacing instance %s", inst["node"], inst["id"])
                await self._delete(inst)
        instances = list(self.instances.items.values())
        load = Counter(i["node"] for i in instances)
        for inst in instances:
            if inst["app"] not in apps:
                await self._delete(inst)
        for name, app in apps.items():
            mine = [i for i in instances if i["app"] == name]
            try:
                await self._reconcile_app(app, mine, nodes, load)
            except ApiError:
                raise
            except Exception:  # one app's bad record must not stop the others
                log.exception("reconciling app %s failed", name)

    async def _reconcile_app(
        self, app: dict[str, Any], mine: list[dict[str, Any]], nodes: list[str], load: Counter[str]
    ) -> None:
        want = desired_instances(app)
        current = [i for i in mine if i["release"] == app["current_release"]]
        old = [i for i in mine if i["release"] != app["current_release"]]
        if len(current) < want and nodes:
            for _ in range(want - len(current)):
                node = min(nodes, key=lambda n: load[n])
                load[node] += 1
                await self._create(app, node)
        elif len(current) > want:
            # drop the ones not serving first, then the newest
            surplus = sorted(current, key=lambda i: (i["status"]["phase"] == "ready", -i["created_at"]))
            for inst in surplus[: len(current) - want]:
                await self._delete(inst)
        ready = sum(1 for i in current if i["status"]["phase"] == "ready")
        if old and ready >= want:
            for inst in old:
                await self._delete(inst)

    async def _create(self, app: dict[str, Any], node: str) -> None:
        iid = f"{app['name']}-v{app['current_release']}-{secrets.token_hex(3)}"
        body = {
            "id": iid,
            "app": app["name"],
            "release": app["current_release"],
            "image": app["current_image"],
            "node": node,
        }
        created = await self.api.post("/v1/instances", body)
        self.instances.items[iid] = created  # seen before the watch echoes it: no double creation

    async def _delete(self, inst: dict[str, Any]) -> None:
        with contextlib.suppress(ApiError):
            await self.api.delete(f"/v1/instances/{inst['id']}")
        self.instances.items.pop(inst["id"], None)
