"""The scheduler: every app runs `desired` instances of its current release, placed on live nodes.

A reconcile looks only at the present (apps, instances, nodes) and is safe to repeat. A release
change is a rollout: new instances are created first; the old release's instances are deleted only
once the new ones are ready, so a release that cannot start leaves the old one serving. A restart
(`App.restart` bumped) is the same rollout, within one release.

Placement spreads an app over the nodes (fewest of its instances first, then the least loaded node)
among those with the memory its release asks (the largest `memory_mb` of its functions and web app)
free: the node's last heartbeat's `memory_free_mb`, less what was placed on it since. No node fits:
the instance waits, and the app's `scale_reason` says why. A node whose lease ran out is gone (its
lease's ttl was the grace): its instances are replaced at once.

Every controller process runs a scheduler; only the one whose `Leadership` holds acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter

from osless.client import ApiError, AsyncApi, ModelInformer
from osless.contracts import App, AppStatus, ImageManifest, Instance, Node, Release
from osless.controllers.leader import Leadership

__all__ = ["Scheduler", "desired_instances", "memory_mb"]

log = logging.getLogger("osless.scheduler")

RESYNC_S = 5.0
DEFAULT_MEMORY_MB = 256


def memory_mb(manifest: ImageManifest) -> int:
    """What one instance of a release asks (as the node agent limits it)."""
    return manifest.memory_mb(DEFAULT_MEMORY_MB)


def desired_instances(app: App, status: AppStatus | None) -> int:
    """How many instances the app should have now: the autoscaler's figure (in the app's status),
    within min and max."""
    if app.current_release is None:
        return 0
    wanted = None if status is None else status.desired
    return min(app.max, max(app.min, app.min if wanted is None else wanted))


class Scheduler:
    def __init__(self, api: AsyncApi, leadership: Leadership) -> None:
        self.api = api
        self.leadership = leadership
        self._wake = asyncio.Event()
        self._memory: dict[tuple[str, int], int] = {}  # (app, release) -> MB one instance asks
        changed = self._changed
        self.apps = ModelInformer(api, "/v1/apps", App, key=lambda a: a.name, on_change=changed)
        self.instances = ModelInformer(api, "/v1/instances", Instance, key=lambda i: i.id, on_change=changed)
        self.nodes = ModelInformer(api, "/v1/nodes", Node, key=lambda n: n.name, on_change=changed)
        self.statuses = ModelInformer(api, "/v1/appstatus", AppStatus, key=lambda s: s.app, on_change=changed)
        self.informers = (self.apps, self.statuses, self.instances, self.nodes)

    async def _changed(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        informers = [asyncio.create_task(i.run()) for i in self.informers]
        informers.append(asyncio.create_task(self._follow_leadership()))
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RESYNC_S)
                self._wake.clear()
                if self.leadership.is_leader and all(i.synced.is_set() for i in self.informers):
                    try:
                        await self.reconcile()
                    except ApiError as e:
                        log.warning("reconcile: %s", e.message)
                        self._wake.set()
                        await asyncio.sleep(0.2)
        finally:
            for t in informers:
                t.cancel()

    async def _follow_leadership(self) -> None:
        """A new leader reconciles at once rather than at the next change."""
        while True:
            await self.leadership.changed.wait()
            self.leadership.changed.clear()
            self._wake.set()

    async def reconcile(self) -> None:
        apps = dict(self.apps.items)
        # Instances on a node whose lease ran out are gone (the lease's ttl was the grace): they are
        # deleted now, and the apps get new ones on live nodes. A node that comes back registers
        # anew and gets new placements; what it ran before is deleted, and it stops it.
        for inst in list(self.instances.items.values()):
            if inst.node not in self.nodes.items:
                log.warning("node %s is gone: replacing instance %s", inst.node, inst.id)
                await self._delete(inst)
        instances = list(self.instances.items.values())
        for inst in instances:
            if inst.app not in apps:
                await self._delete(inst)
        placement = Placement(self.nodes.items, instances, self._memory)
        for name, app in apps.items():
            mine = [i for i in instances if i.app == name]
            try:
                await self._reconcile_app(app, mine, placement)
            except ApiError:
                raise
            except Exception:  # one app's bad record must not stop the others
                log.exception("reconciling app %s failed", name)

    async def _reconcile_app(self, app: App, mine: list[Instance], placement: Placement) -> None:
        want = desired_instances(app, self.statuses.items.get(app.name))
        # An instance of an earlier release, or made before the last `osless restart`, is old: the
        # same rollout replaces both (new ones first, the old deleted once they are ready).
        current = [i for i in mine if i.release == app.current_release and i.restart == app.restart]
        # One a debugger holds out of rotation (`osless debug attach`) serves nothing: another is
        # placed in its stead, and it is never taken as surplus (its session would end under the
        # debugger); once the session ends it is ready again, and the newest of the two goes.
        current = [i for i in current if i.status.phase != "debugging"]
        old = [i for i in mine if i.release != app.current_release or i.restart != app.restart]
        if len(current) < want:
            need = await self._memory_of(app)
            for placed in range(want - len(current)):
                node = placement.pick(app.name, need)
                if node is None:
                    await self._waiting(app, want - len(current) - placed, need, placement)
                    break
                placement.place(app.name, node, need)
                await self._create(app, node)
            else:
                await self._say(app, f"placed: {want} instance(s) after waiting", only_if_waiting=True)
        elif len(current) > want:
            # drop the ones not serving first, then the newest
            surplus = sorted(current, key=lambda i: (i.status.phase == "ready", -i.created_at))
            for inst in surplus[: len(current) - want]:
                await self._delete(inst)
        ready = sum(1 for i in current if i.status.phase == "ready")
        if old and ready >= want:
            for inst in old:
                await self._delete(inst)

    async def _memory_of(self, app: App) -> int:
        key = (app.name, app.current_release or 0)
        if key not in self._memory:
            release = Release.model_validate(await self.api.get(f"/v1/apps/{key[0]}/releases/{key[1]}"))
            self._memory[key] = memory_mb(release.manifest)
        return self._memory[key]

    async def _waiting(self, app: App, missing: int, need: int, placement: Placement) -> None:
        """No node can take the app's next instance now: it waits, and the app's status says why."""
        if not placement.nodes:
            return  # no node up at all (yet): nothing to say of this app in particular
        waiting = f"waiting: {missing} instance(s) need {need} MB each, and no node has it free"
        if self._reason(app).startswith(waiting):
            return  # said already: free memory moves with every heartbeat, the reason need not
        free = ", ".join(f"{n}: {mb} MB" for n, mb in sorted(placement.free_mb().items()))
        reason = f"{waiting} ({free})" if free else waiting
        log.warning("%s: %s", app.name, reason)
        await self._say(app, reason[:200])

    async def _say(self, app: App, reason: str, only_if_waiting: bool = False) -> None:
        """The app's `scale_reason` (with its `desired` as it is)."""
        if only_if_waiting and not self._reason(app).startswith("waiting:"):
            return
        status = self.statuses.items.get(app.name)
        desired = None if status is None else status.desired
        body = {"desired": desired_instances(app, status) if desired is None else desired, "reason": reason}
        if self.leadership.is_leader:
            with contextlib.suppress(ApiError):
                said = await self.api.put(f"/v1/apps/{app.name}/desired", body)
                self.statuses.items[app.name] = AppStatus.model_validate(said)

    def _reason(self, app: App) -> str:
        status = self.statuses.items.get(app.name)
        return "" if status is None else status.scale_reason

    async def _create(self, app: App, node: str) -> None:
        if not self.leadership.is_leader:  # lost it meanwhile: the new leader acts, not us
            return
        iid = f"{app.name}-v{app.current_release}-{secrets.token_hex(3)}"
        body = {
            "id": iid,
            "app": app.name,
            "release": app.current_release,
            "image": app.current_image,
            "node": node,
            "restart": app.restart,
        }
        created = Instance.model_validate(await self.api.post("/v1/instances", body))
        self.instances.items[iid] = created  # seen before the watch echoes it: no double creation

    async def _delete(self, inst: Instance) -> None:
        if not self.leadership.is_leader:
            return
        with contextlib.suppress(ApiError):
            await self.api.delete(f"/v1/instances/{inst.id}")
        self.instances.items.pop(inst.id, None)


class Placement:
    """Where instances may go in one reconcile: live nodes, their free memory and their load."""

    def __init__(
        self,
        nodes: dict[str, Node],
        instances: list[Instance],
        memory: dict[tuple[str, int], int] | None = None,
    ) -> None:
        """`memory`: what one instance of (app, release) asks, where known."""
        self.nodes = nodes
        self.load: Counter[str] = Counter(i.node for i in instances)
        self.per_app: Counter[tuple[str, str]] = Counter((i.app, i.node) for i in instances)
        self.free: dict[str, float] = {}  # node -> MB free; absent: the node does not say
        for name, node in nodes.items():
            if node.memory_free_mb is None:
                continue
            # What the node reported, less what was placed on it after that report.
            self.free[name] = float(node.memory_free_mb)
            for i in instances:
                if i.node == name and i.created_at > node.updated_at:
                    self.free[name] -= (memory or {}).get((i.app, i.release), DEFAULT_MEMORY_MB)

    def pick(self, app: str, need_mb: int) -> str | None:
        fits = [n for n in self.nodes if self.free.get(n, float("inf")) >= need_mb]
        if not fits:
            return None
        return min(fits, key=lambda n: (self.per_app[(app, n)], self.load[n], n))

    def place(self, app: str, node: str, need_mb: int) -> None:
        self.load[node] += 1
        self.per_app[(app, node)] += 1
        if node in self.free:
            self.free[node] -= need_mb

    def free_mb(self) -> dict[str, int]:
        return {n: int(mb) for n, mb in self.free.items()}
