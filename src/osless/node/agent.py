"""The node agent: make the instances assigned to this node run, whatever happened before.

Level-triggered like a kubelet: on every change (and every few seconds regardless) it compares
the instances the API assigns to this node with the supervisors it has, and starts or stops the
difference. Running it twice, or after a crash, does the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from osless.client import ApiError, AsyncApi, Informer, ModelInformer
from osless.contracts import App, ImageManifest, Instance
from osless.images.runtime import runtime_layer
from osless.logs import DELETED_PREFIX, LogWriter, remove_app_logs
from osless.node import doctor
from osless.node.cgroups import Cgroups, Limits
from osless.node.egress import EgressProxy
from osless.node.egress_rules import Network
from osless.node.images import ImageError, NodeImages
from osless.node.isolation import sandbox_spec
from osless.node.metrics import Meter
from osless.node.spawn import RootZygote, Zygote, ZygoteFailed
from osless.node.supervisor import STOP_GRACE, Supervisor
from osless.node.traces import SpanStore
from osless.node.volumes import VolumeError, Volumes
from osless.runtime.sandbox import SandboxSpec
from osless.sdk.app import read_volumes
from osless.sdk.errors import UsageError

__all__ = ["NodeAgent", "run_dir_for"]

log = logging.getLogger("osless.node")

RESYNC_S = 5.0
ZYGOTE_LINGER_S = 60.0  # keep an unused release warm a while: a rollback then starts fast
HEARTBEAT_S = 1.0
# No heartbeat for this long: the node's lease runs out, and the scheduler replaces its instances at
# once. The node counts the same time on its side: past it, it assumes it was replaced (fenced).
NODE_TTL_S = 3.0
VOLUMES_EVERY_S = 10.0
IMAGES_EVERY_S = 60.0
# An app's call of another's function: the longest function timeout (3600 s), and the trip.
CALL_TIMEOUT_S = 3660.0


def _memory_mb() -> dict[str, int]:
    """The host's memory and what is available of it, from /proc/meminfo (empty where there is none)."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                found["memory_total_mb" if key == "MemTotal" else "memory_free_mb"] = (
                    int(value.split()[0]) // 1024
                )
    return found


def run_dir_for(data_dir: Path) -> Path:
    """Where instance sockets live: the data dir if its path is short enough for a unix socket."""
    candidate = data_dir / "run"
    if len(str(candidate)) <= 60:
        return candidate
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"osless-{digest}"


class NodeAgent:
    def __init__(
        self,
        api: AsyncApi,
        *,
        name: str,
        data_dir: Path,
        gateway: tuple[str, int] | None = None,
        sandbox: bool = True,
        protections: list[doctor.Protection] | None = None,
        egress_allow: list[Network] | None = None,
    ) -> None:
        """`sandbox`: whether to sandbox apps, if this host can (`protections`, probed when not given).
        `egress_allow`: internal ranges apps may reach when they list them (`osless up --egress-allow`)."""
        self.api = api
        self.name = name
        self.data_dir = data_dir
        # Pulled from the API by digest and checked, in the node's own folder: never the API's store.
        self.images = NodeImages(api, data_dir / "node" / "images", report=self._image_log)
        self._images_checked = time.monotonic()
        self._image_failures: dict[str, str] = {}  # instance -> why its image could not be had
        self.logs_dir = data_dir / "logs"
        # Its instances' recent spans, for `osless traces`; OSLESS_TRACES=off in the node's environment
        # gives instances no span pipe (what benchmarks compare against).
        self.traces = SpanStore() if os.environ.get("OSLESS_TRACES", "on") != "off" else None
        self.node_api: str | None = None  # the node API's URL, reported in the heartbeat
        self.run_dir = run_dir_for(data_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The instances' sockets: the node's alone (root, 700), never shown to a sandbox.
        self.sockets_dir = self.run_dir / "sockets"
        self.sockets_dir.mkdir(exist_ok=True, mode=0o700)
        self.supervisors: dict[str, Supervisor] = {}
        # Taken off this node and finishing their requests: their zygotes (their instances' parents)
        # stay until they are done.
        self.draining: set[Supervisor] = set()
        self.meter = Meter()  # its instances' starts and CPU, for the node's /metrics
        self.zygotes: dict[str, Zygote] = {}
        self._zygote_starts: dict[str, asyncio.Task[Zygote]] = {}
        self._zygote_idle_since: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._renewed = time.monotonic()  # when the last renewed lease was asked for
        self.protections = protections if protections is not None else doctor.check()
        missing = {p.name for p in self.protections if not p.ok}
        # `osless up` has warned about each missing protection already.
        self.sandboxed = sandbox and not any(name in missing for name in doctor.REQUIRED)
        self.volumes = Volumes(
            data_dir, self.run_dir, images=doctor.VOLUME_QUOTAS not in missing, warn=self._volume_log
        )
        self._starting: dict[str, int] = {}  # app -> zygotes of it being started
        # One-off commands running here (`node.runs`): their apps' volumes and egress, and their
        # images, stay while they run.
        self.runs: Counter[str] = Counter()  # app -> commands
        self.run_images: Counter[str] = Counter()  # image -> commands
        # Scoped by data dir: other agents (other data dirs) on this host keep their groups.
        found = Cgroups.detect(scope=hashlib.sha256(str(data_dir).encode()).hexdigest()[:12])
        self.cgroups = found if isinstance(found, Cgroups) else None
        self.gateway = gateway  # (host, port) of this node's gateway, as reported in its heartbeat
        self.relay: str | None = None  # "host:port" of this node's relay (`node.relay`), once it listens
        # Apps' function calls wait as long as the function runs: on connections of their own, so
        # that a crowd of them never holds up the heartbeat.
        self._calls_api = api.clone()
        self.egress = (
            EgressProxy(
                gateway=gateway, log=self._egress_log, allow=egress_allow or [], call=self._call_function
            )
            if self.sandboxed and gateway
            else None
        )
        # Made (or found) once per platform install: an upgrade makes a new one.
        self.runtime = runtime_layer(data_dir / "runtime")
        self.root = RootZygote(
            LogWriter(self.logs_dir / "node" / "root-zygote.log", source="root-zygote"), self.runtime
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._app_logs: dict[tuple[str, str], LogWriter] = {}  # (app, egress|volumes) -> writer
        self.informer = ModelInformer(
            api, "/v1/instances", Instance, key=lambda i: i.id, on_change=self._changed, node=name
        )
        self.configs: dict[str, dict[str, Any]] = {}  # app -> {"values", "version", "token"}
        # Values in clear ride on the events (this node's token only): no second request per change.
        self._config_versions = Informer(
            api, f"/v1/nodes/{name}/config", key=lambda o: str(o["app"]), on_change=self._config_changed
        )
        # id(zygote) -> the push to it under way, and the zygotes whose config moved on meanwhile.
        self._config_pushes: dict[int, asyncio.Task[None]] = {}
        self._config_again: set[int] = set()
        self._catch_up_lock = asyncio.Lock()
        # Which apps exist: a deleted app's volumes go once nothing of it runs here.
        self.apps = ModelInformer(api, "/v1/apps", App, key=lambda a: a.name, on_change=self._apps_changed)
        # Volumes are looked at when apps change or zygotes stop, and now and then: not on every
        # instance change (a start from zero should not read the mount table).
        self._volumes_checked = 0.0

    async def _changed(self) -> None:
        self._wake.set()

    async def _apps_changed(self) -> None:
        self._volumes_checked = 0.0
        self._wake.set()

    async def run(self) -> None:
        await self.root.start()
        if self.cgroups is not None:
            self.cgroups.sweep()  # groups an earlier run left behind (kill -9)
            self.cgroups.fill_pool()
        self._renewed = time.monotonic()  # the lease is asked for now: not lapsed yet
        tasks = [
            asyncio.create_task(self.informer.run()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(self._config_versions.run()),
            asyncio.create_task(self.apps.run()),
        ]
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RESYNC_S)
                self._wake.clear()
                if self.informer.synced.is_set():
                    try:
                        await self.reconcile()
                    except Exception:  # level-triggered: the next pass tries again
                        log.exception("node reconcile failed")
        finally:
            for t in tasks:
                t.cancel()
            await self.shutdown()

    def fenced(self) -> bool:
        """Whether this node's lease may have run out: then its instances may have been replaced
        elsewhere, and it writes nothing of them until it has listed what is still assigned to it."""
        return time.monotonic() - self._renewed > NODE_TTL_S

    async def _heartbeat(self) -> None:
        reported: dict[tuple[str, str], int] = {}
        while True:
            sent = time.monotonic()
            with contextlib.suppress(ApiError, TimeoutError):
                await self.api.put(f"/v1/nodes/{self.name}", self._node_report())
                if self.fenced():
                    log.warning(
                        "this node's lease lapsed (no heartbeat for %.1fs): registered anew; what is "
                        "no longer assigned here is stopped once listed again",
                        sent - self._renewed,
                    )
                    await asyncio.wait_for(self.informer.relist(), RESYNC_S)
                    self._renewed = sent
                    await self._after_lapse()
                self._renewed = sent
                if self.egress is not None and dict(self.egress.calls) != reported:
                    reported = dict(self.egress.calls)
                    edges = [{"caller": a, "callee": b, "count": n} for (a, b), n in sorted(reported.items())]
                    await self.api.put(f"/v1/nodes/{self.name}/calls", {"calls": edges})
            await asyncio.sleep(HEARTBEAT_S)

    def _node_report(self) -> dict[str, Any]:
        """The heartbeat: the lease, and what `osless nodes` shows of this node."""
        report: dict[str, Any] = {"ttl_s": NODE_TTL_S, "pid": os.getpid()}
        if self.gateway is not None:
            host, port = self.gateway
            report.update(address=host, gateway=f"http://{host}:{port}")
        if self.relay is not None:
            report["relay"] = self.relay
        if self.node_api is not None:
            report["api"] = self.node_api
        report.update(_memory_mb())
        return report

    async def reconcile(self) -> None:
        desired = {i: o for i, o in self.informer.items.items() if o.node == self.name}
        for iid in list(self.supervisors):
            if iid not in desired:
                self._background(self._drain(self.supervisors.pop(iid)))
        for iid, obj in desired.items():
            if iid not in self.supervisors:
                if not await self._has_manifest(iid, obj):
                    continue
                try:
                    sup = self._supervisor(obj)
                except (OSError, KeyError, ValueError, TypeError) as e:  # e.g. an image this node lacks
                    log.error("cannot run instance %s: %s", iid, e)
                    continue
                self.supervisors[iid] = sup
                sup.start()
        await self._retire_zygotes()
        if time.monotonic() - self._images_checked > IMAGES_EVERY_S:
            self._images_checked = time.monotonic()
            await self._collect_images(desired)
        if any(
            z.app not in self._config_versions.items and self._placed_here(z.app)
            for z in self.zygotes.values()
        ):
            self._background(self._catch_up_configs())
        if time.monotonic() - self._volumes_checked > VOLUMES_EVERY_S:
            self._volumes_checked = time.monotonic()
            await self._put_volumes_away()
        if self.cgroups is not None:
            self.cgroups.fill_pool()

    async def _drain(self, sup: Supervisor) -> None:
        self.draining.add(sup)
        try:
            await sup.stop(self._why_removed(sup))
        finally:
            self.draining.discard(sup)
            self._wake.set()  # its zygote may go now

    def _in_use(self, app: str) -> bool:
        """Whether a zygote of `app` runs or starts here, or an instance of it is assigned here."""
        return (
            self._starting.get(app, 0) > 0
            or self.runs.get(app, 0) > 0
            or any(z.app == app and not z.closed for z in self.zygotes.values())
            or any(o.app == app and o.node == self.name for o in self.informer.items.values())
        )

    async def _put_volumes_away(self) -> None:
        """Unmount the volumes of apps that no longer run here (this run's, or a killed run's), and
        delete those of deleted apps."""
        gone = self.volumes.apps_on_disk() - set(self.apps.items) if self.apps.synced.is_set() else set()
        if self.apps.synced.is_set():
            for key in [k for k in self._app_logs if k[0] not in self.apps.items and not self._in_use(k[0])]:
                self._app_logs.pop(key).close()  # a deleted app's: its folder goes next
            await self._remove_deleted_logs()
        for app in self.volumes.mounted_apps() | gone:
            if self._in_use(app):
                continue
            try:
                if app in gone:
                    await self.volumes.delete(app, functools.partial(self._in_use, app))
                else:
                    await self.volumes.detach(app, functools.partial(self._in_use, app))
            except (VolumeError, OSError) as e:  # tried again on the next pass
                log.warning("the volumes of %s not put away: %s", app, e)

    async def _remove_deleted_logs(self) -> None:
        """The log folders of deleted apps of which nothing runs here any more (`DELETE /v1/apps/{app}`
        removes the API's copy only): a new app of the same name never reads them, and they do not
        fill the node's disk. Also what a stop between a move aside and its removal left."""
        try:
            folders = list((self.logs_dir / "apps").iterdir())
        except FileNotFoundError:
            return
        for folder in folders:
            app = folder.name
            if app.startswith(DELETED_PREFIX) and not folder.is_symlink():
                await asyncio.to_thread(shutil.rmtree, folder, True)
            elif not app.startswith(".") and app not in self.apps.items and not self._in_use(app):
                await remove_app_logs(folder)

    async def app_config(self, app: str, refresh: bool = False) -> dict[str, Any]:
        """The app's config in clear and its token, as the API gives them to this node only."""
        if refresh or app not in self.configs:
            self.configs[app] = await self.api.get(f"/v1/nodes/{self.name}/apps/{app}/config")
        return self.configs[app]

    async def _config_changed(self) -> None:
        for zyg in list(self.zygotes.values()):
            seen = self._config_versions.items.get(zyg.app)  # none: the app is not placed here
            if seen is not None and _behind(zyg, seen):
                self._push_config(zyg)

    def _push_config(self, zyg: Zygote) -> None:
        """Send the zygote its app's latest config, now; if a push to it is under way, that one goes
        again once done, so its versions arrive in order. Zygotes never wait on each other: one that
        is stuck holds up only its own instances."""
        task = self._config_pushes.get(id(zyg))
        if task is not None and not task.done():
            self._config_again.add(id(zyg))
            return
        task = self._config_pushes[id(zyg)] = asyncio.create_task(self._push_to(zyg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push_to(self, zyg: Zygote) -> None:
        try:
            while True:
                self._config_again.discard(id(zyg))
                seen = self._config_versions.items.get(zyg.app)
                if seen is not None and not zyg.closed and _behind(zyg, seen):
                    try:
                        await self._configure(zyg, seen)
                    except (ApiError, ZygoteFailed, TimeoutError, OSError) as e:
                        # OSError: a lingering zygote's image may have been collected meanwhile.
                        log.warning("config v%s of %s not pushed: %s", seen["version"], zyg.app, e)
                if id(zyg) not in self._config_again:
                    return
        finally:
            self._config_pushes.pop(id(zyg), None)

    async def _configure(self, zyg: Zygote, cfg: dict[str, Any]) -> None:
        old = dict((zyg.config or {}).get("values") or {})
        changed = {k for k in set(old) | set(cfg["values"]) if old.get(k) != cfg["values"].get(k)}
        schema = self._manifest(zyg.image).config
        if any(schema[k].restart for k in changed if k in schema):
            await self._roll(zyg)  # read once at start: a new zygote, instances one by one
        else:
            await zyg.configure(cfg["values"], cfg["version"])
        if cfg["version"] > self.configs.get(zyg.app, {}).get("version", -1):
            self.configs[zyg.app] = cfg

    async def _catch_up_configs(self) -> None:
        """Lingering zygotes of apps placed here again: the API sends an app's changes only while it
        has an instance on this node (a DELETE otherwise), so one changed meanwhile is read again."""
        async with self._catch_up_lock:
            for app in {z.app for z in self.zygotes.values() if not z.closed} - set(
                self._config_versions.items
            ):
                if app not in self.configs or not self._placed_here(app):
                    continue
                try:
                    cfg = await self.api.get(f"/v1/nodes/{self.name}/apps/{app}/config")
                except ApiError as e:
                    log.warning("config of %s not caught up: %s", app, e)
                    continue
                # Known again (its changes come with the watch, which may have brought a newer one).
                self._config_versions.items.setdefault(app, cfg)
                await self._config_changed()

    def _placed_here(self, app: str) -> bool:
        return any(o.app == app and o.node == self.name for o in self.informer.items.values())

    async def _roll(self, old: Zygote) -> None:
        starting = self._zygote_starts.get(old.image)
        if starting is not None:  # let a start under way finish first, or it would overwrite ours
            with contextlib.suppress(Exception):
                await asyncio.shield(starting)
        new = await self._new_zygote(old.image, old.uid)
        self.zygotes[old.image] = new
        await self._config_changed()
        for sup in [s for s in self.supervisors.values() if s.image == old.image]:
            await sup.restart()  # it forks from `new` now; one at a time, each ready before the next
        await old.stop()
        old.log.close()

    def _supervisor(self, obj: Instance) -> Supervisor:
        if self.sandboxed and obj.uid is None:
            raise ValueError("the instance has no uid (the API sets it): it runs as nobody else's")
        uid = int(obj.uid or 0) if self.sandboxed else os.getuid()
        return Supervisor(
            obj.model_dump(),
            zygote=functools.partial(self.zygote, obj.image, uid),
            run_dir=self.sockets_dir,
            log_dir=self.logs_dir / "apps" / obj.app,
            report=self._report,
            cgroups=self.cgroups,
            limits=Limits(memory_mb=self._memory_mb(obj.image)),
            uid=uid,
            traces=self.traces,
            meter=self.meter,
            # What the instance's own server gives its requests once told to stop (runtime.instance:
            # the longest handler timeout and a second), then what any stop gets for the rest.
            stop_grace_s=self._manifest(obj.image).longest_timeout_s() + 1 + STOP_GRACE,
        )

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _after_lapse(self) -> None:
        """Once listed afresh after a lapse: stop what is gone, and report the status of what is
        still here (a fenced node wrote none)."""
        await self.reconcile()
        for iid, sup in list(self.supervisors.items()):
            await self._report(iid, dict(sup.status))

    async def _report(self, iid: str, status: dict[str, Any]) -> None:
        if iid not in self.supervisors or self.fenced():
            return  # deleted meanwhile, or maybe replaced elsewhere: nobody wants its status
        try:
            await self.api.put(f"/v1/instances/{iid}/status", status)
        except ApiError as e:
            if e.status != 404:
                log.warning("status of %s not reported: %s", iid, e.message)

    async def zygote(self, image: str, uid: int) -> Zygote:
        """The running zygote of `image`, started once however many instances ask at the same time;
        `uid` is its app's (sandboxes run as it)."""
        zyg = self.zygotes.get(image)
        if zyg is not None and not zyg.closed:
            return zyg
        task = self._zygote_starts.get(image)
        if task is None:
            task = asyncio.create_task(self._start_zygote(image, uid))
            self._zygote_starts[image] = task
            task.add_done_callback(lambda _: self._zygote_starts.pop(image, None))
        return await asyncio.shield(task)

    def _manifest(self, image: str) -> ImageManifest:
        return self.images.cached_manifest(image)  # pulled before the instance's supervisor is made

    async def _has_manifest(self, iid: str, obj: Instance) -> bool:
        """Whether the manifest of the instance's image is here, pulled (and checked) now if need be;
        if it cannot be had, the instance says why (once per reason), and the next pass tries again."""
        self._image_failures = {i: m for i, m in self._image_failures.items() if i in self.informer.items}
        try:
            await self.images.manifest(obj.image)
        except (ImageError, ValueError) as e:
            log.error("cannot run instance %s: %s", iid, e)
            if self._image_failures.get(iid) != str(e):
                self._image_failures[iid] = str(e)
                with contextlib.suppress(ApiError):
                    await self.api.put(f"/v1/instances/{iid}/status", {"phase": "failed", "message": str(e)})
            return False
        self._image_failures.pop(iid, None)
        return True

    async def _collect_images(self, desired: dict[str, Instance]) -> None:
        in_use = {o.image for o in desired.values()} | set(self.zygotes) | set(self._zygote_starts)
        in_use |= {image for image, n in self.run_images.items() if n > 0}
        try:
            await self.images.collect(in_use)
        except OSError as e:  # tried again on the next round
            log.warning("the node's image cache was not collected: %s", e)

    def _image_log(self, app: str, message: str) -> None:
        log.error("%s: %s", app, message)
        self._app_log(app, "images", message)

    def _memory_mb(self, image: str) -> int:
        """One instance serves every handler of the app, so it gets the largest memory any asks for."""
        # Within the SDK's bounds: the manifest was checked against its contract when it was pulled.
        return self._manifest(image).memory_mb()

    async def _start_zygote(self, image: str, uid: int) -> Zygote:
        zyg = await self._new_zygote(image, uid)
        self.zygotes[image] = zyg
        await self._config_changed()  # a change that came while it started (after its config was read)
        return zyg

    async def _new_zygote(self, image: str, uid: int) -> Zygote:
        if not self.root.running:  # it died: start it again before anything else
            await self.root.start()
        manifest = self._manifest(image)
        app = manifest.app
        self._starting[app] = self._starting.get(app, 0) + 1
        try:
            return await self._start_new_zygote(image, uid, manifest, app)
        finally:
            self._starting[app] -= 1
            if not self._starting[app]:
                del self._starting[app]

    async def _start_new_zygote(self, image: str, uid: int, manifest: ImageManifest, app: str) -> Zygote:
        try:
            layers = await self.images.layers(image)
        except (ImageError, OSError) as e:
            raise ZygoteFailed(str(e)) from e
        spec = (await self.sandbox_for(uid, manifest, layers)).to_json() if self.sandboxed else None
        cfg = await self.app_config(app, refresh=True)
        zyg = Zygote(
            image=image,
            app=app,
            uid=uid,
            sandbox=spec,
            config={"values": cfg["values"], "version": cfg["version"]},
            instance_env={"OSLESS_TOKEN": cfg["token"]},  # its only credential: scoped to its own app
            code_dir=layers["code"],
            deps_dir=layers["deps"],
            entry=manifest.entry,
            log=LogWriter(self.logs_dir / "apps" / app / f"zygote-{image[:12]}.log", source="zygote"),
        )
        await zyg.start(self.root)
        return zyg

    async def _call_function(
        self, caller: str, app: str, function: str, event: bytes, request_id: str, trace: str = ""
    ) -> tuple[int, str, bytes]:
        """An app's call of another's function (from the egress proxy): the API decides, told by
        this node's token which of its apps calls; its answer goes back to the app as it is.
        `trace`: the caller's traceparent (checked by the proxy), so the callee's span is its child."""
        headers = {"content-type": "application/json"}
        if request_id:
            headers["x-osless-request-id"] = request_id
        if trace:
            headers["traceparent"] = trace
        path = f"/v1/nodes/{self.name}/apps/{caller}/invoke/{app}/{function}"
        if function.startswith("queue:"):  # a send to a queue (the egress proxy's name for it)
            path = f"/v1/nodes/{self.name}/apps/{caller}/queues/{app}/{function[6:]}/messages"
        try:
            resp = await self._calls_api.send(
                "POST",
                path,
                content=event,
                headers=headers,
                timeout=CALL_TIMEOUT_S,
            )
        except ApiError as e:
            failed = {"error": {"code": "api_unreachable", "message": e.message}}
            return 502, "application/json", json.dumps(failed).encode()
        return resp.status_code, resp.headers.get("content-type", "application/json"), resp.content

    async def sandbox_for(self, uid: int, manifest: ImageManifest, layers: dict[str, Path]) -> SandboxSpec:
        """The sandbox of a release of an app on this node: its volumes attached, its egress served.
        A release zygote's, and a one-off command's (`node.runs`): both the same."""
        app = manifest.app
        try:  # checked again: the manifest was printed by the app's own process at build time
            declared = {p: v if isinstance(v, str) else v.model_dump() for p, v in manifest.volumes.items()}
            volumes = await self.volumes.attach(app, uid, read_volumes(declared))
        except (UsageError, VolumeError, OSError) as e:
            raise ZygoteFailed(f"its volumes are not ready: {e}") from e
        egress_socket = None
        if self.egress is not None:
            # Named by uid (unique per app) rather than by name: socket paths are short.
            egress_socket = self.run_dir / "egress" / f"{uid}.sock"
            egress_socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            await self.egress.add_app(app, egress_socket, list(manifest.egress))
            os.chown(egress_socket, uid, uid)  # the sandbox's uid connects to it; nobody else
            egress_socket.chmod(0o600)
        return sandbox_spec(
            manifest,
            uid=uid,
            layers=[layers["code"], layers["deps"]],
            runtime=self.runtime.path,
            data_dir=self.data_dir,
            run_dir=self.run_dir,
            volumes=volumes,
            egress_socket=egress_socket,
        )

    async def forget_egress(self, app: str) -> None:
        """Stop serving `app`'s egress once nothing of it runs here: no zygote, no one-off command."""
        running = self.runs.get(app) or any(z.app == app and not z.closed for z in self.zygotes.values())
        if self.egress is not None and not running:
            await self.egress.remove_app(app)

    def _why_removed(self, sup: Supervisor) -> str:
        """Why the scheduler took an instance off this node, as far as the node can tell, for the
        platform's line in its log (a scale down, a rollout, an app deleted)."""
        app = self.apps.items.get(sup.app)
        if app is None:
            return "removed from this node (its app was deleted)" if self.apps.synced.is_set() else "removed"
        if app.current_release is not None and sup.release != app.current_release:
            return f"replaced by release {app.current_release} (a rollout)"
        if sup.made_for_restart != app.restart:
            return "replaced (osless restart)"
        return "scaled down (or moved off this node)"

    def _egress_log(self, app: str, message: str) -> None:
        self._app_log(app, "egress", message)

    def _volume_log(self, app: str, message: str) -> None:
        log.warning("%s: %s", app, message)
        self._app_log(app, "volumes", message)

    def _app_log(self, app: str, name: str, message: str) -> None:
        """A line of the node's own in the app's logs (`osless logs`), in `<name>.log`."""
        writer = self._app_logs.get((app, name))
        if writer is None:
            writer = self._app_logs[(app, name)] = LogWriter(
                self.logs_dir / "apps" / app / f"{name}.log", source=name
            )
        writer.write(message, "osless")

    async def _retire_zygotes(self) -> None:
        in_use = {
            s_image for s_image in (o.image for o in self.informer.items.values() if o.node == self.name)
        }
        in_use |= {s.image for s in self.draining}  # a zygote's instances end with it
        now = time.monotonic()
        for image, zyg in list(self.zygotes.items()):
            if image in in_use and not zyg.closed:
                self._zygote_idle_since.pop(image, None)
                continue
            since = self._zygote_idle_since.setdefault(image, now)
            deleted = self.apps.synced.is_set() and zyg.app not in self.apps.items  # no rollback to come
            if zyg.closed or deleted or now - since > ZYGOTE_LINGER_S:
                del self.zygotes[image]
                self._zygote_idle_since.pop(image, None)
                await zyg.stop()
                zyg.log.close()
                self._volumes_checked = 0.0  # its app's volumes may be put away now
                await self.forget_egress(zyg.app)

    async def shutdown(self) -> None:
        sups, self.supervisors = [*self.supervisors.values(), *self.draining], {}
        # The node stopping (its operator asked): requests in flight get a short grace, not their
        # handlers' timeouts, which may be an hour; those draining already are cut short too.
        await asyncio.gather(*(s.stop(node_stopping=True) for s in sups), return_exceptions=True)
        for zyg in self.zygotes.values():
            await zyg.stop()
        self.zygotes.clear()
        if self.egress is not None:
            await self.egress.close()
        await self._calls_api.aclose()
        await self.root.stop()
        await self.volumes.detach_all()
        if self.cgroups is not None:
            self.cgroups.close()


def _behind(zyg: Zygote, cfg: dict[str, Any]) -> bool:
    """Whether `zyg` has not been sent `cfg` (nor a newer version) yet."""
    return int((zyg.config or {}).get("version", -1)) < int(cfg["version"])
