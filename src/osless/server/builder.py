"""The builder process (`osless builder --api URL`, `python -m osless.builder`): builds deploys, never
in the API's process, and reaches the API over REST only, with a `builder` token.

It registers (a name on a lease of its own, kept alive every 2 s), claims one queued deploy at a
time per slot (`--concurrency`, 1 by default: a build uses the machine), reads its source, runs
`builder.Builder` in a worker thread as the API once did (sandboxed, with its own egress to the
package index and its own uv cache), posts its log in bounded batches, uploads the layer archives
the API lacks and the manifest, then the result. Its image store is its own (`<data dir>/images`),
so a redeploy with the same requirements finds its dependency layer here (`deps_cached`); after each
pass of the API's collector it collects that store by what the retention keeps (`collect`). On
SIGTERM it stops its builds (their deploys fail, saying so) and its lease. Killed, its lease lapses
and any server fails what it was building (api/routes/deploys.py `fail_orphaned_builds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import signal
import traceback
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from osless.bounds import MAX_LINE_CHARS, cap
from osless.builder import Builder, BuildError, stop_all_builds
from osless.builder.egress import BuildEgress, index_hosts
from osless.client import AsyncApi
from osless.contracts import MAX_RELEASE_COMMANDS, ImageManifest
from osless.errors import ApiError
from osless.images import ImageStore, collect_uid_folders
from osless.node import run_dir_for
from osless.node.egress_rules import Network
from osless.node.isolation import build_spec
from osless.runwire import RELEASE_TIMEOUT_S
from osless.server.node import host_protections, private_dir

__all__ = ["BuilderConfig", "BuilderHost", "run_builder"]

log = logging.getLogger("osless.builder")

RENEW_S = 2.0
COLLECT_S = 5.0  # while a build runs, how often the builder looks whether it may sweep
KEPT_WAIT_S = 20.0  # a long poll for the API collector's next pass
CLAIM_WAIT_S = 20.0
FLUSH_S = 0.2
BATCH_CHARS = 512 * 1024  # of log text per post: at most ~3 MiB of JSON, escapes and all
BATCH_LINES = 1000  # per post: the API's limit
PENDING_CHARS = 16 * 1024 * 1024  # held while the API is slow; past it lines are dropped, said
MAX_SOURCE_BYTES = 1024 * 1024 * 1024
UID_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0
# The API runs a release's steps before it answers the result: each up to its timeout, at most 10.
RESULT_TIMEOUT = httpx.Timeout(MAX_RELEASE_COMMANDS * RELEASE_TIMEOUT_S + 60.0, connect=5.0)
STOPPED = "the builder stopped mid-build: deploy again"
LOCK_FILE = "builder.lock"


@dataclass
class BuilderConfig:
    api_url: str
    token: str
    data_dir: Path  # its image store, uv caches, run dir
    sandbox: bool = True
    concurrency: int = 1
    egress_allow: list[Network] = field(default_factory=list)


class _Log:
    """A build's lines on their way to the API: appended from the build's thread, posted in batches."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque()
        self.chars = 0
        self.dropped = 0

    def add(self, line: str) -> None:
        line = cap(line.rstrip("\n"), MAX_LINE_CHARS)
        if self.chars + len(line) > PENDING_CHARS:
            self.dropped += 1
            return
        self.lines.append(line)
        self.chars += len(line)

    def put_back(self, batch: list[str]) -> None:
        self.lines.extendleft(reversed(batch))
        self.chars += sum(map(len, batch))

    def take(self) -> list[str]:
        out: list[str] = []
        size = 0
        while self.lines and len(out) < BATCH_LINES and (not out or size + len(self.lines[0]) <= BATCH_CHARS):
            line = self.lines.popleft()
            size += len(line)
            out.append(line)
        self.chars -= size
        if not self.lines and self.dropped:
            out.append(f"==> {self.dropped} lines dropped: the API was slow to take them")
            self.dropped = 0
        return out


class BuilderHost:
    """One builder process's parts: the Builder, its lease, its claim loops."""

    def __init__(self, cfg: BuilderConfig, *, sandboxed: bool) -> None:
        self.cfg = cfg
        data_dir = cfg.data_dir.resolve()
        images = ImageStore(data_dir / "images")
        images.clean_tmp()
        run_dir = run_dir_for(data_dir)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        sandbox = functools.partial(build_spec, data_dir=data_dir, run_dir=run_dir) if sandboxed else None
        # Builds reach the package index only, through an egress proxy of their own (`builder.egress`).
        self.egress = (
            BuildEgress(run_dir / "build-egress", hosts=index_hosts(os.environ), allow=cfg.egress_allow)
            if sandboxed
            else None
        )
        self.builder = Builder(
            images, sandbox=sandbox, egress=self.egress, cache_dir=data_dir / "cache" / "uv"
        )
        self.api = AsyncApi(cfg.api_url, cfg.token, timeout=60.0)
        self.name = ""
        self.stopping = False
        self.busy: set[asyncio.Task[Any]] = set()  # the slots building now (the others only wait)

    async def register(self) -> None:
        """A name on a fresh lease; tried until the API answers (a wrong token stops the process)."""
        while True:
            try:
                self.name = str((await self.api.request("POST", "/v1/builders"))["name"])
                log.info("builder %s (pid %d) registered at %s", self.name, os.getpid(), self.cfg.api_url)
                return
            except ApiError as e:
                if e.status in (401, 403):
                    raise SystemExit(f"the API refused this builder's token: {e.message}") from None
                log.warning("cannot register with the API (trying again): %s", e.message)
                await asyncio.sleep(1.0)

    async def keep_lease(self) -> None:
        while True:
            await asyncio.sleep(RENEW_S)
            try:
                await self.api.request("PUT", f"/v1/builders/{self.name}")
            except ApiError as e:
                if e.status == 404:  # lapsed: what it claimed under that name was failed by a server
                    log.warning("builder %s lost its lease; registering anew", self.name)
                    await self.register()
                else:
                    log.warning("the builder's lease was not renewed (trying again): %s", e.message)

    async def collect(self) -> None:
        """After each pass of the API's collector (`GET /v1/builds/kept` waits for one), its own store
        by the same rules: the manifests, layers, archives and locks no kept release names, and the
        uv caches and lock folders of uids no app has, once past the retention's grace. Never while
        one of its builds runs: a pass that finds one busy is swept once the builds are done."""
        after = 0
        while True:
            if self.busy:
                await asyncio.sleep(COLLECT_S)
                continue
            try:
                kept = await self.api.request(
                    "GET",
                    "/v1/builds/kept",
                    params={"after": after, "wait_s": KEPT_WAIT_S},
                    timeout=KEPT_WAIT_S + 30,
                )
            except ApiError as e:
                log.warning("what the retention keeps was not read (trying again): %s", e.message)
                await asyncio.sleep(COLLECT_S)
                continue
            if kept is None:
                continue
            try:
                done = await asyncio.to_thread(self._collect, kept)
            except Exception:  # a disk error: tried again at the next pass, not in a loop now
                log.exception("the builder's collection failed")
                done = True
            if done:
                after = int(kept["collection"])

    def _collect(self, kept: dict[str, Any]) -> bool:
        """One sweep of the builder's store; False if a build started meanwhile (it stopped)."""

        def busy() -> bool:
            return bool(self.busy)

        grace_s = float(kept["grace_s"])
        images = self.builder.images
        swept = images.collect(
            keep_images=set(kept["images"]), keep_locks=set(kept["locks"]), grace_s=grace_s, busy=busy
        )
        if swept.stopped:
            return False
        live = {str(uid) for uid in kept["uids"]}
        freed = collect_uid_folders(
            (self.builder.cache_dir, images.locks_dir),
            live=live,
            grace_s=grace_s,
            busy=busy,
            in_use=self.builder.uid_folders,
        )
        if swept.manifests or swept.layers or swept.locks or freed:
            log.info(
                "collected %d manifests, %d layers, %d locks, %d bytes",
                swept.manifests,
                swept.layers,
                swept.locks,
                swept.bytes_freed + freed,
            )
        return not busy()

    async def work(self) -> None:
        """One slot: claim a queued deploy, build it, again."""
        while not self.stopping:
            name = self.name
            try:
                deploy = await self.api.request(
                    "POST",
                    "/v1/builds/claim",
                    params={"builder": name, "wait_s": CLAIM_WAIT_S},
                    timeout=CLAIM_WAIT_S + 30,
                )
            except ApiError as e:
                log.warning("claiming a deploy failed (trying again): %s", e.message)
                await asyncio.sleep(1.0)
                continue
            if deploy is not None:
                task = asyncio.current_task()
                assert task is not None
                self.busy.add(task)
                try:
                    await self.build(deploy, name)
                finally:
                    self.busy.discard(task)

    async def build(self, deploy: dict[str, Any], name: str) -> None:
        id = str(deploy["id"])
        base, params = f"/v1/builds/{id}", {"builder": name}
        lines = _Log()
        loop = asyncio.get_running_loop()
        ended = asyncio.Event()
        flusher = asyncio.create_task(self._flush(base, params, lines, ended))

        def emit(line: str) -> None:
            loop.call_soon_threadsafe(lines.add, line)

        def uid_for(app: str) -> int:
            # From the build's thread, once it knows the name it read (the API decides the name).
            ask = self.api.request("POST", f"{base}/app", params=params, json={"name": app})
            try:
                answer = asyncio.run_coroutine_threadsafe(ask, loop).result(timeout=UID_TIMEOUT_S)
            except ApiError as e:
                raise BuildError(f"the API did not give the app's uid: {e.message}") from e
            return int(answer["uid"])

        result: dict[str, Any]
        try:
            emit(f"==> Builder {name} (pid {os.getpid()})")
            archive = await self._source(base, params)
            built = await asyncio.to_thread(
                self.builder.build, archive, emit, app_name=deploy.get("app"), uid_for=uid_for
            )
            await self._upload(base, params, built.image, built.manifest)
            result = {"image": built.image, "deps_cached": built.deps_cached, "seconds": built.seconds}
        except BuildError as e:
            result = {"error": STOPPED if self.stopping else cap(str(e))}
        except ApiError as e:
            result = {"error": cap(f"the builder could not reach the API: {e.message}")}
        except Exception as e:  # the deploy must end as failed, whatever broke
            log.error("deploy %s crashed: %s", id, cap("".join(traceback.format_exception(e))))
            result = {"error": cap(f"internal error during build: {type(e).__name__}: {e}")}
        finally:
            ended.set()  # the flusher posts what is left, then ends
        # Awaited, never cancelled: a post cut short lost its batch, or landed after the result had
        # closed the log, which drops it (a failed import's last lines, its error, went missing so).
        await flusher
        await self._result(id, base, params, result)

    async def _source(self, base: str, params: dict[str, str]) -> bytes:
        data = bytearray()
        async for chunk in self.api.download(f"{base}/source?builder={params['builder']}"):
            data += chunk
            if len(data) > MAX_SOURCE_BYTES:
                raise BuildError(f"the source archive passes {MAX_SOURCE_BYTES} bytes: refused")
        return bytes(data)

    async def _upload(self, base: str, params: dict[str, str], image: str, manifest: ImageManifest) -> None:
        """The layer archives the API lacks, then the manifest (which names them)."""
        images = self.builder.images
        for archive in manifest.archived_layers().values():
            sha = archive.sha256
            have = await self.api.request("GET", f"{base}/layers/{sha}", params=params)
            if have["present"]:
                continue
            path = images.archive_path(sha)
            await self.api.request(
                "PUT",
                f"{base}/layers/{sha}",
                params=params,
                content=_read(path),
                headers={
                    "content-type": "application/octet-stream",
                    "content-length": str(path.stat().st_size),
                },
                timeout=None,
            )
        data = await asyncio.to_thread(images.manifest_bytes, image)
        got = await self.api.request(
            "PUT", f"{base}/image", params=params, content=data, headers={"content-type": "application/json"}
        )
        if got["image"] != image:
            raise BuildError(f"the API stored image {got['image']}, not {image}")

    async def _flush(self, base: str, params: dict[str, str], lines: _Log, ended: asyncio.Event) -> None:
        """Post the build's lines every FLUSH_S; once `ended` is set, what is left, and return."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), FLUSH_S)
            last = ended.is_set()  # read before the post: a build that ends during it gets one more
            await self._post_lines(base, params, lines)
            if last:
                return

    async def _post_lines(self, base: str, params: dict[str, str], lines: _Log) -> None:
        while batch := lines.take():
            try:
                await self.api.request("POST", f"{base}/log", params=params, json={"lines": batch})
            except ApiError as e:
                if e.status != 0 and e.status < 500:  # refused (409: no longer this builder's)
                    log.warning("build log lines refused: %s", e.message)
                    return
                lines.put_back(batch)  # the API is away: sent again at the next flush
                log.warning("build log lines not posted (trying again): %s", e.message)
                return

    async def _result(self, id: str, base: str, params: dict[str, str], result: dict[str, Any]) -> None:
        """Posted until the API answers (a restart in between is waited out, within the lease)."""
        for _ in range(30):
            try:
                # The API runs the release's steps (`App(release=...)`) before it answers.
                await self.api.request(
                    "POST", f"{base}/result", params=params, json=result, timeout=RESULT_TIMEOUT
                )
                return
            except ApiError as e:
                if e.status != 0 and e.status < 500:
                    log.warning("deploy %s: the result was refused: %s", id, e.message)
                    return
                log.warning("deploy %s: the result was not posted (trying again): %s", id, e.message)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        with contextlib.suppress(ApiError):
            await self.api.request("DELETE", f"/v1/builders/{self.name}")
        if self.egress is not None:
            self.egress.close()
        await self.api.aclose()


async def _read(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, 1024 * 1024):
            yield chunk


def hold_data_dir(data_dir: Path) -> IO[bytes]:
    """The builder's folder, its alone while the returned file stays open: another builder's sweep
    would remove the layers and archives this one's builds use (its busy set is its own). A second
    builder on the folder stops at once (SystemExit), saying so; the lock goes with the process."""
    f = (data_dir / LOCK_FILE).open("ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise SystemExit(
            f"another builder uses the folder {data_dir}: give this one its own with --data-dir"
        ) from None
    return f


async def run_builder(cfg: BuilderConfig) -> None:
    """`osless builder`: build queued deploys until SIGINT/SIGTERM."""
    private_dir(cfg.data_dir)
    with hold_data_dir(cfg.data_dir):
        await _run(cfg)


async def _run(cfg: BuilderConfig) -> None:
    sandboxed, _ = host_protections(cfg.sandbox, "BUILDS RUN WITHOUT A SANDBOX")
    host = BuilderHost(cfg, sandboxed=sandboxed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await host.register()
        lease = asyncio.create_task(host.keep_lease(), name="the builder's lease")
        collector = asyncio.create_task(host.collect(), name="the builder's collector")
        slots = [asyncio.create_task(host.work(), name=f"build slot {k}") for k in range(cfg.concurrency)]
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, lease, *slots], return_when=asyncio.FIRST_COMPLETED)
        host.stopping = True
        stop_all_builds()  # a build in flight fails now, and says why
        waiter.cancel()
        # Each slot building posts how its build ended; one waiting for a claim is cancelled.
        for task in slots:
            if task not in host.busy:
                task.cancel()
        _, pending = await asyncio.wait(slots, timeout=STOP_GRACE_S)
        for task in [*pending, lease, collector]:
            task.cancel()
        await asyncio.gather(*slots, lease, collector, return_exceptions=True)
        for task in (lease, *slots):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise SystemExit(f"the builder stopped: {task.exception()!r}")
    finally:
        await host.close()
