"""The routing table: which instances of an app can take a request, and which one should.

Fed by watches of apps and instances. Ready instances of the app's current release are preferred;
during a rollout, before any of them is ready, the previous release's ready instances serve.
Instances of this node are reached over their unix sockets; those of other nodes through their
node's relay (`node.relay`), whose address the watch of nodes gives.

Static stability: the table is what the API last said. While the API cannot be reached, the
gateway keeps serving from it (the informers never clear what they listed), says so once in its
log and in its health answer, and says so again once the API is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import ValidationError

from osless.client import ApiError, AsyncApi, ModelInformer
from osless.contracts import App, ImageManifest, Instance, Node, manifest_problem
from osless.gateway.outliers import Address, Outliers
from osless.gateway.upstream import Relayed, Upstream

__all__ = ["Backend", "NoBackend", "Router", "Timeouts", "web_timeouts"]

log = logging.getLogger("osless.gateway")


WAKE_EVERY_S = 3.0
DEFAULT_CONCURRENCY_LIMIT = 1000
DEFAULT_MAX_BODY_MB = 10.0
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_DURATION_S = 3600.0
API_PROBE_S = 1.0  # how often the gateway asks whether the API answers
API_PROBE_TIMEOUT_S = 2.0


class Timeouts(NamedTuple):
    """How long a request may wait for each byte of its answer (`idle`), and live in all (`whole`)."""

    idle: float
    whole: float


_DEFAULT_LIMITS = (DEFAULT_CONCURRENCY_LIMIT, int(DEFAULT_MAX_BODY_MB * 1024 * 1024))


class NoBackend(Exception):
    """No instance can take the request; `status` and `code` say why (404 unknown app, 503 none ready)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Backend:
    """A ready instance and the pooled HTTP/1.1 connections to its two unix sockets: `upstream`
    for web requests, `control` for function calls (the platform's own socket). `socket` names
    where it is reached: its web socket's path, or for one on another node, that node's relay too."""

    id: str
    app: str
    release: int
    socket: str
    upstream: Upstream
    control: Upstream
    outstanding: int = 0
    peer: tuple[int, int] | None = None
    # The web route's timeouts from the release's manifest, once the router has read it (the hot
    # path takes only instances whose manifest it has).
    web_timeouts: Timeouts | None = None
    relay: Address | None = None  # the relay it is reached through, if on another node


class Router:
    """`node`: the node this gateway is on (None: every instance is taken as local); `token`: the
    node's token, which other nodes' relays ask for."""

    def __init__(self, api: AsyncApi, *, node: str | None = None, token: str = "") -> None:
        self.api = api
        self.node = node
        self.token = token
        # Read into their contracts as they arrive: the request path only reads what a rebuild made.
        self.apps = ModelInformer(api, "/v1/apps", App, key=lambda a: a.name, on_change=self._rebuild)
        self.instances = ModelInformer(
            api, "/v1/instances", Instance, key=lambda i: i.id, on_change=self._rebuild
        )
        self.nodes = ModelInformer(
            api, "/v1/nodes", Node, key=lambda n: n.name, on_change=self._nodes_changed
        )
        self.relays: dict[str, tuple[str, int]] = {}  # node -> its relay's (host, port)
        self.outliers = Outliers()  # relays that just failed to take a connection
        self.backends: dict[str, Backend] = {}
        self._candidates: dict[str, list[Backend]] = {}
        # app -> (requests in flight at most, request body bytes at most)
        self._limits: dict[str, tuple[int, int]] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._manifests: dict[tuple[str, int], ImageManifest] = {}
        # One read of a release's manifest at a time, however many requests want it at once.
        self._fetching: dict[tuple[str, int], asyncio.Task[ImageManifest]] = {}
        self._woken: dict[str, float] = {}
        # What the last wake answered the app wants: the router follows the apps' spec, not their
        # status, so that the autoscaler's every write does not rebuild its table.
        self._wanted: dict[str, int | None] = {}
        self._placed: set[str] = set()  # apps with an instance at the last rebuild
        self._waking: set[str] = set()  # apps with a wake call under way
        self.api_down_since: float | None = None  # wall clock: the API not answering since then

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.apps.run()),
            asyncio.create_task(self.instances.run()),
            asyncio.create_task(self._probe_api()),
        ]
        if self.node is not None:
            self._tasks.append(asyncio.create_task(self.nodes.run()))

    async def _probe_api(self) -> None:
        """A watch that stops speaking may be idle or may be dead: ask the API now and then."""
        while True:
            try:
                await asyncio.wait_for(self.api.get("/healthz"), API_PROBE_TIMEOUT_S)
                up = True
            except (ApiError, TimeoutError):
                up = False
            if not up and self.api_down_since is None:
                self.api_down_since = time.time()
                log.warning(
                    "API unreachable since %s; serving the last known routes (%d apps, %d ready instances)",
                    _iso(self.api_down_since),
                    len(self.apps.items),
                    len(self.backends),
                )
            elif up and self.api_down_since is not None:
                log.warning(
                    "API reachable again (unreachable for %.0fs, since %s); routes follow it again",
                    time.time() - self.api_down_since,
                    _iso(self.api_down_since),
                )
                self.api_down_since = None
            await asyncio.sleep(API_PROBE_S)

    def health(self) -> dict[str, Any]:
        """What the gateway's health answer says of the API and of its routes."""
        if self.api_down_since is None:
            return {"ok": True}
        return {
            "ok": True,
            "api": f"unreachable since {_iso(self.api_down_since)}",
            "api_unreachable_since": self.api_down_since,
            "routes": "last known",
        }

    async def synced(self) -> None:
        """Returns once the watches have listed what exists: the table is whole."""
        await self.apps.synced.wait()
        await self.instances.synced.wait()
        if self.node is not None:
            await self.nodes.synced.wait()

    async def _nodes_changed(self) -> None:
        # Every heartbeat is a change: the table is rebuilt only when a relay's address is.
        relays: dict[str, tuple[str, int]] = {}
        for name, obj in self.nodes.items.items():
            found = _address(obj.relay)
            if found is not None:
                relays[name] = found
        if relays != self.relays:
            self.relays = relays
            self.outliers.keep(relays.values())
            await self._rebuild()

    def _reach(self, instance: Instance) -> tuple[str, Relayed | None] | None:
        """How a ready instance is reached: (its name in the table, the relay to go through or None
        for its unix socket here); None when it cannot be (its node's relay is unknown)."""
        socket, node = instance.status.socket or "", instance.node
        if self.node is None or node == self.node:
            return socket, None
        relay = self.relays.get(node)
        if relay is None:
            return None
        return f"relay://{relay[0]}:{relay[1]}/{instance.id}{socket}", Relayed(
            relay[0], relay[1], self.token, instance.id, "web"
        )

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for b in self.backends.values():
            await b.upstream.close()
            await b.control.close()

    async def _rebuild(self) -> None:
        live: dict[str, Instance] = {}
        reach: dict[str, tuple[str, Relayed | None]] = {}
        placed = {i.app for i in self.instances.items.values()}
        for gone in self._placed - placed:  # scaled to zero (or lost them all): the next request wakes it
            self._wanted.pop(gone, None)
        self._placed = placed
        for i in self.instances.items.values():
            if i.status.phase == "ready" and i.status.socket and i.status.control:
                found = self._reach(i)
                if found is not None:
                    live[i.id], reach[i.id] = i, found
        for iid in list(self.backends):
            b = self.backends[iid]
            if iid not in live or reach[iid][0] != b.socket or _peer(live[iid]) != b.peer:
                del self.backends[iid]
                task = asyncio.create_task(_close_later(b))
                self._closing.add(task)  # the loop keeps only weak references to tasks
                task.add_done_callback(self._closing.discard)
        for iid, inst in live.items():
            if iid not in self.backends:
                name, relay = reach[iid]
                peer = _peer(inst)
                if relay is None:
                    upstream, control = Upstream(name, peer), Upstream(inst.status.control or "", peer)
                else:  # the relay checks the peer, on its node
                    upstream = Upstream(name, relay=relay, outliers=self.outliers)
                    control = Upstream(
                        name + "#control", relay=relay._replace(kind="control"), outliers=self.outliers
                    )
                b = Backend(
                    id=iid,
                    app=inst.app,
                    release=inst.release,
                    socket=name,
                    upstream=upstream,
                    control=control,
                    peer=peer,
                    relay=None if relay is None else (relay.host, relay.port),
                )
                manifest = self._manifests.get((b.app, b.release))
                if manifest is not None:
                    b.web_timeouts = web_timeouts(manifest)
                else:  # read now, so the first requests find it (and take the hot path)
                    self._fetch((b.app, b.release)).add_done_callback(_retrieve)
                self.backends[iid] = b
        by_app: dict[str, list[Backend]] = {}
        for b in self.backends.values():
            by_app.setdefault(b.app, []).append(b)
        # Worked out here, on each change, rather than on each request.
        self._candidates = {}
        self._limits = {}
        for app, ready in by_app.items():
            spec = self.apps.items.get(app)
            current = None if spec is None else spec.current_release
            self._candidates[app] = [b for b in ready if b.release == current] or ready
        for app, obj in self.apps.items.items():
            policy = obj.autoscale
            self._limits[app] = (policy.concurrency_limit, int(policy.max_body_mb * 1024 * 1024))
        self._changed.set()
        self._changed = asyncio.Event()

    def limits(self, app: str) -> tuple[int, int]:
        """(requests in flight at most, request body bytes at most) for `app`."""
        return self._limits.get(app, _DEFAULT_LIMITS)

    def pick_now(self, app: str, exclude: frozenset[str] = frozenset()) -> Backend | None:
        """`pick` without waiting: None when no ready instance can take it right now. Instances
        behind a relay marked down are passed over while any other can take it."""
        found = self._candidates.get(app, [])
        if len(found) == 1 and not exclude:
            return found[0]
        if exclude:
            found = [b for b in found if b.socket not in exclude]
        if len(found) > 1 and self.outliers.active():
            down = self.outliers.down
            found = [b for b in found if b.relay is None or not down(b.relay)] or found
        # The fewest outstanding, one of those tied picked at random (reservoir sampling): one pass,
        # no list built, on each request that has a choice.
        best, least, ties = None, 0, 0
        for b in found:
            n = b.outstanding
            if best is None or n < least:
                best, least, ties = b, n, 1
            elif n == least:
                ties += 1
                if random.random() * ties < 1.0:
                    best = b
        return best

    async def pick(self, app: str, wait_s: float, exclude: frozenset[str] = frozenset()) -> Backend:
        """The ready instance with the fewest outstanding requests; waits while instances are starting.

        `exclude`: the sockets of instances that just refused a connection (they are stopping) are
        not picked again; the same instance's next run has new ones.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            changed = self._changed  # set by any change from now on, even one during the wake call
            if app not in self.apps.items:
                raise NoBackend(404, "app_not_found", f"no app named {app!r} is deployed here")
            found = self.pick_now(app, exclude)
            if found is not None:
                return found
            if self.apps.items[app].current_release is None:
                raise NoBackend(503, "not_deployed", f"app {app!r} has no release yet; `osless deploy` it")
            # The activator: an app at zero (or whose instances all went) is woken, and the request
            # waits here while an instance forks. At once when the app wants no instance; when it
            # already wants some, asked again every few seconds while it waits. One call at a time.
            now = loop.time()
            wanted = self._wanted.get(app)
            due = not wanted or now - self._woken.get(app, -WAKE_EVERY_S) >= WAKE_EVERY_S
            if due and app not in self._waking and not self._starting(app):
                self._woken[app] = now
                self._waking.add(app)
                try:
                    with contextlib.suppress(ApiError):
                        status = await self.api.post(f"/v1/apps/{app}/wake")
                        self._wanted[app] = status.get("desired")
                finally:
                    self._waking.discard(app)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NoBackend(
                    504,
                    "timeout",
                    f"no instance of {app!r} was ready within {wait_s:.0f}s; "
                    f"see `osless ps {app}` and `osless logs {app}`",
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, WAKE_EVERY_S))

    def _starting(self, app: str) -> bool:
        return any(
            i.app == app and i.status.phase in ("pending", "starting") for i in self.instances.items.values()
        )

    async def current_manifest(self, app: str) -> ImageManifest | None:
        """The manifest of the app's current release (None before its first), read once per release."""
        spec = self.apps.items.get(app)
        if spec is None or spec.current_release is None:
            return None
        key = (app, spec.current_release)
        found = self._manifests.get(key)
        if found is not None:
            return found
        return await asyncio.shield(self._fetch(key))

    async def manifest(self, backend: Backend) -> ImageManifest:
        """The image manifest of the backend's release (timeouts, functions); releases never change."""
        found = self._manifests.get((backend.app, backend.release))
        if found is not None:
            return found
        # Shielded: a request whose client leaves does not cancel the read the others wait on.
        return await asyncio.shield(self._fetch((backend.app, backend.release)))

    def _fetch(self, key: tuple[str, int]) -> asyncio.Task[ImageManifest]:
        task = self._fetching.get(key)
        if task is None:
            task = self._fetching[key] = asyncio.create_task(self._read_manifest(*key))
            task.add_done_callback(lambda _: self._fetching.pop(key, None))  # a failure is tried again
        return task

    async def _read_manifest(self, app: str, release: int) -> ImageManifest:
        try:
            got = await self.api.get(f"/v1/apps/{app}/releases/{release}")
            manifest = ImageManifest.model_validate(got["manifest"])
        except ApiError as e:
            raise NoBackend(
                502,
                "release_unavailable",
                f"cannot read release v{release} of {app!r} from the API: {e.message}",
            ) from e
        except (KeyError, TypeError, ValidationError) as e:
            why = manifest_problem(e) if isinstance(e, ValidationError) else f"no manifest ({e})"
            raise NoBackend(
                502, "release_unavailable", f"release v{release} of {app!r} has no valid manifest: {why}"
            ) from e
        self._manifests[(app, release)] = manifest
        for b in self.backends.values():
            if (b.app, b.release) == (app, release):
                b.web_timeouts = web_timeouts(manifest)
        return manifest


def _peer(instance: Instance) -> tuple[int, int] | None:
    """Who must listen on the instance's sockets: the process the node agent started (pid), as
    the uid it gave it."""
    status = instance.status
    if status.uid is None or status.pid is None:
        return None
    return status.pid, status.uid


def _address(relay: Any) -> tuple[str, int] | None:
    """A node's relay "host:port" (host in brackets for IPv6) as (host, port); None if not one."""
    if not isinstance(relay, str):
        return None
    host, sep, port = relay.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def web_timeouts(manifest: ImageManifest) -> Timeouts:
    """A web request's timeouts, from its release's manifest. A function with `http=True` answers
    web requests too (after its own timeout_s, which the instance applies, and a second for the
    trip back)."""
    web = manifest.web
    http = [float(f.timeout_s) + 1 for f in manifest.functions.values() if f.http]
    if web is None:
        if http:
            return Timeouts(max(http), max(http))
        return Timeouts(DEFAULT_TIMEOUT_S, DEFAULT_MAX_DURATION_S)
    idle = max([float(web.timeout_s), *http])
    return Timeouts(idle, max(idle, float(web.max_duration_s)))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a failed read ahead is tried again by the request that needs it


async def _close_later(b: Backend) -> None:
    # requests in flight on a retired instance finish (or fail) on their own; then free the pool
    for _ in range(600):
        if b.outstanding == 0:
            break
        await asyncio.sleep(0.1)
    await b.upstream.close()
    await b.control.close()
