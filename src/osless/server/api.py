"""The API's process: the store opened and migrated, the admin token, the API server, the controllers
and the collector; beside it, a builder process of its own (`server.builder_child`): never a build here.

`osless up` runs an `ApiHost` on SQLite next to its machine's node; `osless server --etcd URL` runs
one alone, on etcd, with nodes joining from elsewhere (`osless node join`). Several servers may share
one etcd: they must share the secret key too (checked at start, see `check_secret_key`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gc
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from osless.api.app import create_app
from osless.api.auth import Tokens, issue_token
from osless.api.broker import Broker
from osless.api.consumers import Consumers
from osless.api.invocations import Dispatcher
from osless.api.metrics import ApiMetrics, TimedStore
from osless.api.migrations import MigrationError, Paths, backup_sqlite, migrate
from osless.api.peers import Peers, ServerLease
from osless.api.replicate import Replicator
from osless.api.resources import Resources
from osless.api.secrets import SecretBox, load_key
from osless.api.state import ApiState
from osless.client import AsyncApi
from osless.controllers import run_controllers
from osless.images import ImageStore
from osless.node import run_dir_for
from osless.node.egress_rules import Network
from osless.server.builder_child import BuilderChild
from osless.server.nats import NatsChild
from osless.server.node import host_protections, private_dir
from osless.store import Conflict, SQLiteStore, Store, StoreError, open_store

__all__ = [
    "ApiConfig",
    "ApiHost",
    "backup_prefix",
    "check_secret_key",
    "fresh_token",
    "private_data_dir",
    "run_server",
    "save_credentials",
    "wait_for_stop",
]

log = logging.getLogger("osless")

KEEP_BACKUPS = 3
SECRET_KEY_CHECK = "/meta/secretkey"
GATEWAY_FOLLOW_S = 2.0
STOP_TASKS_S = 5.0  # what a stop waits for its tasks to end once cancelled


@dataclass
class ApiConfig:
    """What the API's process needs, whichever command starts it."""

    data_dir: Path  # images, build logs, the admin token, the secret key (unless given)
    store_url: str = ""  # default: the SQLite store in data_dir
    api_port: int = 7070
    host: str = "127.0.0.1"
    max_upload_mb: int = 100
    sandbox: bool = True  # builds, in sandboxes
    builder: bool = True  # a builder process beside the API (`<data dir>/builder`)
    secret_key_file: Path | None = None
    egress_allow: list[Network] = field(default_factory=list)
    gateway_url: str = ""  # where function calls go; default: a live node's gateway, followed
    advertise_url: str = ""  # the API's URL as peer servers reach it; default: api_url
    nats_url: str = ""  # the message engine; default: a nats-server of its own (`server.nats`)
    nats_port: int = 0  # its port (default: a free one)
    nats_replicas: int = 1  # of the platform's streams: 3 on a 3-node JetStream cluster

    @property
    def peer_url(self) -> str:
        return self.advertise_url or self.api_url

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"


def save_credentials(api: str, token: str, gateway: str) -> Path:
    from osless.cli.credentials import credentials_path  # the CLI's (and typer's) only when saving

    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api": api, "token": token, "gateway": gateway}, f)
    os.replace(tmp, path)
    return path


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to its host, which stops every part together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def admin_token(resources: Resources, data_dir: Path) -> str:
    """The admin token: made on first start, kept in the data dir (mode 600) for later starts; made
    again if it was revoked, so that whoever holds the data dir can always get in."""
    path = data_dir / "admin-token"
    if path.exists():
        token = path.read_text().strip()
        if await Tokens(resources.store).lookup(token) is not None:
            return token
        log.warning("the admin token in %s was revoked: a new one replaces it", path)
    token = await issue_token(resources, "admin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token


async def revoke_named(resources: Resources, name: str, role: str) -> None:
    tokens = Tokens(resources.store)
    for digest, record in await tokens.list():
        if record.role == role and record.name == name:
            await tokens.revoke(digest)


async def fresh_token(resources: Resources, name: str, role: str) -> str:
    """A token for one of the platform's own parts, made again at each start; the previous one of
    that name is revoked."""
    await revoke_named(resources, name, role)
    return await issue_token(resources, name, role=role)


def controller_name(data_dir: Path, role: str = "controller") -> str:
    """The name of this server's controller (or builder) token: its own, so that a server starting on a
    shared store revokes only its previous token, never another server's (whose part would then stop)."""
    where = f"{socket.gethostname()}\0{data_dir}".encode()
    return f"{role}-" + hashlib.sha256(where).hexdigest()[:12]


async def backup_prefix(store: Store, dest_dir: Path, version: int, *, keep: int = KEEP_BACKUPS) -> Path:
    """Every key of the platform (the store's root, nothing else of the etcd it shares), as JSON lines
    in `dest_dir/store.v<version>-<UTC time>.backup`; the newest `keep` stay.

    A dump rather than `etcdctl snapshot`: it needs no etcdctl on the server, covers this platform's
    root alone (an etcd snapshot holds every root, and restoring one replaces the whole cluster), and
    is put back key by key through the same `Store`. It is read at one revision, so it is consistent."""
    items, revision = await store.list("")
    at = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
    dest = dest_dir / f"store.v{version}-{stamp}.backup"
    tmp = dest.with_name(dest.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps({"revision": revision, "schema": version}) + "\n")
        for kv in items:
            f.write(json.dumps({"key": kv.key, "value": base64.b64encode(kv.value).decode()}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)  # whole or absent
    for old in sorted(dest_dir.glob("store.v*.backup"), key=lambda p: p.stat().st_mtime)[:-keep]:
        old.unlink(missing_ok=True)
    return dest


async def check_secret_key(store: Store, key: bytes) -> None:
    """Servers sharing a store must share the key that encrypts its secrets: the first one records a
    digest of it, and one started with another key stops before it writes a secret nobody can read."""
    digest = hashlib.sha256(b"osless secret key check\0" + key).hexdigest()
    with contextlib.suppress(Conflict):
        await store.put(SECRET_KEY_CHECK, digest.encode(), if_revision=0)
    kv = await store.get(SECRET_KEY_CHECK)
    if kv is not None and kv.value.decode() != digest:
        raise SystemExit(
            "this server's secret key is not the one the store's secrets were written with: give every "
            "server the same key (--secret-key-file, or OSLESS_SECRET_KEY)"
        )


class ApiHost:
    """The API's parts on one loop: `open` (store, migrations, tokens), `serve` (the API answering),
    `start_controllers`, `stop`."""

    def __init__(self, cfg: ApiConfig, command: str = "osless server") -> None:
        self.cfg = cfg
        self.command = command  # how its errors begin
        self.data_dir = cfg.data_dir.resolve()
        try:
            self.store: Store = (
                open_store(cfg.store_url) if cfg.store_url else SQLiteStore(self.data_dir / "state.db")
            )
        except ValueError as e:  # a URL that names no store we have
            raise SystemExit(f"{command}: {e}") from None
        self.run_dir = run_dir_for(self.data_dir)
        self.token = ""  # the admin's
        self.controller_token = ""
        self.builder_token = ""
        self.state: ApiState | None = None
        self.client: AsyncApi | None = None
        self.server: _Server | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.builder: BuilderChild | None = None
        self.sandboxed = True
        self.server_lease: ServerLease | None = None
        self.nats: NatsChild | None = None
        self.broker: Broker | None = None

    async def open(self, *, sandboxed: bool) -> Resources:
        """The store started and migrated, the admin and controller tokens made, the API's state built."""
        cfg, data_dir = self.cfg, self.data_dir
        try:
            await self.store.start()
        except StoreError as e:
            raise SystemExit(
                f"{self.command}: the store {cfg.store_url or data_dir} cannot be opened: {e}"
            ) from None
        try:
            # Before anything reads the store: what an earlier release wrote is brought to this code's shapes.
            backup: Callable[[int], Path]
            if isinstance(self.store, SQLiteStore):
                backup = functools.partial(backup_sqlite, self.store.path)
            else:
                loop = asyncio.get_running_loop()
                store = self.store
                # migrate() calls it from a worker thread: the dump runs on this loop.
                backup = lambda version: asyncio.run_coroutine_threadsafe(  # noqa: E731
                    backup_prefix(store, data_dir, version), loop
                ).result()
            await migrate(self.store, Paths(data_dir, self.run_dir), backup=backup)
        except MigrationError as e:
            await self.store.close()
            raise SystemExit(f"{self.command}: {e}") from None
        except BaseException:
            await self.store.close()
            raise
        metrics = ApiMetrics()
        resources = Resources(TimedStore(self.store, metrics))
        key = load_key(data_dir, cfg.secret_key_file)
        secrets = SecretBox(key)
        if not isinstance(self.store, SQLiteStore):  # a store other servers may share
            await check_secret_key(self.store, key)
        self.token = await admin_token(resources, data_dir)
        self.controller_token = await fresh_token(resources, controller_name(data_dir), "controller")
        await revoke_named(resources, "controller", "controller")  # the one name of older releases
        if cfg.builder:
            self.builder_token = await fresh_token(resources, controller_name(data_dir, "builder"), "builder")
        self.sandboxed = sandboxed
        images = ImageStore(data_dir / "images")
        images.clean_tmp()
        (data_dir / "sources").mkdir(mode=0o700, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if isinstance(self.store, SQLiteStore):  # no other server shares it: its builder stopped with it
            await resources.drop_builders()
        self.state = ApiState(
            secrets=secrets,
            resources=resources,
            images=images,
            data_dir=data_dir,
            gateway_url=cfg.gateway_url,
            max_upload_bytes=cfg.max_upload_mb * 1024 * 1024,
            metrics=metrics,
        )
        # The message engine: a nats-server of its own unless one is given (a cluster's).
        nats_url = cfg.nats_url
        if not nats_url:
            if not isinstance(self.store, SQLiteStore):
                log.warning(
                    "a message engine of this server's own: servers sharing a store must share one "
                    "(give each --nats URL), or each keeps the async invocations it accepted to itself"
                )
            self.nats = NatsChild(data_dir, cfg.nats_port)
            self.nats.start()  # from this thread: it dies with it (PR_SET_PDEATHSIG)
            nats_url = self.nats.url
        self.broker = Broker(nats_url, cfg.nats_replicas)
        await self.broker.connect()
        self.state.broker = self.broker
        if not isinstance(self.store, SQLiteStore):  # peers: other servers sharing the store
            self.server_lease = ServerLease(self.store, controller_name(data_dir, "server"), cfg.peer_url)
            self.state.peers = Peers(
                store=self.store,
                secrets=secrets,
                http=self.state.http,
                server_id=self.server_lease.server_id,
                images=images,
                max_layer_bytes=self.state.max_layer_bytes,
                max_source_bytes=self.state.max_upload_bytes,
            )
        return resources

    async def serve(self) -> asyncio.Task[None]:
        """The API listening; its task (which ends only if the server does)."""
        assert self.state is not None
        self.server = _Server(
            uvicorn.Config(
                create_app(self.state),
                host=self.cfg.host,
                port=self.cfg.api_port,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=2,  # open log follows and watches must not hold shutdown
                # The peer's address is the connection's: nodes are tied to it, and failed logins
                # limited by it; an X-Forwarded-For from a local process must not stand in for it.
                proxy_headers=False,
            )
        )
        task = asyncio.create_task(self.server.serve(), name="the API server")
        while not self.server.started:
            if task.done():
                if task.exception():
                    raise task.exception()  # type: ignore[misc]
                raise SystemExit(
                    f"could not listen on {self.cfg.host}:{self.cfg.api_port} (port in use? pass --api-port)"
                )
            await asyncio.sleep(0.01)
        return task

    def start_controllers(self) -> list[asyncio.Task[None]]:
        """The scheduler, the autoscaler (with the controller token: no secrets, no tokens), the
        collector, and the gateway function calls go to when none was given."""
        assert self.state is not None
        self.client = AsyncApi(self.cfg.api_url, self.controller_token)
        self.tasks = [
            # One candidate among any controller processes run against this API: the leader acts.
            asyncio.create_task(run_controllers(self.client), name="the controllers"),
            asyncio.create_task(self.state.collector.run(), name="the collector"),
        ]
        if self.cfg.builder:
            self.builder = BuilderChild(
                api_url=self.cfg.api_url,
                token=self.builder_token,
                data_dir=self.data_dir / "builder",
                sandbox=self.sandboxed,
            )
            self.tasks.append(asyncio.create_task(self.builder.run(), name="the builder process"))
        if self.nats is not None:
            self.tasks.append(asyncio.create_task(self.nats.run(), name="the message engine"))
        if self.broker is not None:
            dispatcher = Dispatcher(self.state, self.broker)
            self.tasks.append(asyncio.create_task(dispatcher.run(), name="the invocations' dispatcher"))
            consumers = Consumers(self.state, self.broker)
            self.tasks.append(asyncio.create_task(consumers.run(), name="the queues' consumers"))
        if not self.cfg.gateway_url:
            self.tasks.append(asyncio.create_task(self._follow_gateways(), name="the gateway follower"))
        if self.server_lease is not None:  # once the API answers: peers may ask it at once
            self.tasks.append(asyncio.create_task(self.server_lease.run(), name="the server's lease"))
        if self.state.peers is not None:  # each release copied here too: it outlives its own server
            replicas = Replicator(
                self.state.resources, self.state.peers, self.state.images, self.state.source
            )
            self.tasks.append(asyncio.create_task(replicas.run(), name="the replicas"))
        return self.tasks

    async def _follow_gateways(self) -> None:
        """Function calls go through a gateway: with no node here, one of a live node's."""
        assert self.state is not None
        state = self.state
        while True:
            with contextlib.suppress(Exception):  # the next round looks again
                nodes, _ = await state.resources.list_nodes()
                urls = sorted(n.gateway for n in nodes if n.gateway)
                if urls and state.gateway_url not in urls:
                    state.gateway_url = urls[0]
            await asyncio.sleep(GATEWAY_FOLLOW_S)

    async def stop(self, servers: list[asyncio.Task[None]]) -> None:
        if self.builder is not None:  # first, while the API answers: its builds in flight fail, saying so
            await self.builder.stop()
        for t in self.tasks:
            t.cancel()
        if self.tasks:
            # A task that swallowed its cancel must not hold the stop (and the children) forever.
            _, stuck = await asyncio.wait(self.tasks, timeout=STOP_TASKS_S)
            for t in stuck:
                log.error("%s did not stop within %.0f s; stopping without it", t.get_name(), STOP_TASKS_S)
        if self.server_lease is not None:  # peers stop asking it now, not when its lease lapses
            await self.server_lease.drop()
        if self.server is not None:
            self.server.should_exit = True
        await asyncio.gather(*servers, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.close()
        if self.nats is not None:
            await self.nats.stop()
        if self.state is not None and self.controller_token:
            # Its controllers stepped down above: a server retired for good leaves no live token
            # behind (one that starts again makes a new one anyway).
            with contextlib.suppress(StoreError):
                await revoke_named(self.state.resources, controller_name(self.data_dir), "controller")
        await self.store.close()


def private_data_dir(data_dir: Path) -> None:
    """Nothing the platform writes is for other local users: state, tokens, keys, app code, logs.

    The umask covers every file and folder made from here on (sandboxes set their own, for the roots
    they build); the data dir itself, and the files an older version made readable, are fixed here.
    Image layers stay readable by all inside (their own modes, set when sealed): sandboxes bind each
    one at its own path as an unprivileged uid, which never needs to cross the data dir.
    """
    private_dir(data_dir)
    for name in ("state.db", "state.db-wal", "state.db-shm", "admin-token", "secret.key"):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).chmod(0o600)


async def wait_for_stop(parts: list[asyncio.Task[None]]) -> bool:
    """Run until SIGINT/SIGTERM or a part ends on its own; whether one did (said loudly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([waiter, *parts], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    failed = False
    for task in parts:
        if task.done() and not task.cancelled():
            error = task.exception()
            log.error("%s stopped: %r", task.get_name(), error, exc_info=error)
            failed = True
    return failed


async def run_server(
    cfg: ApiConfig, *, save: bool = True, on_ready: Callable[[str, str], None] | None = None
) -> None:
    """`osless server`: the API, the controllers, the collector and a builder process, no node; until
    SIGINT/SIGTERM. `on_ready(api_url, admin_token)` once it answers."""
    private_data_dir(cfg.data_dir.resolve())
    sandboxed, _ = host_protections(cfg.sandbox)
    host = ApiHost(cfg)
    await host.open(sandboxed=sandboxed)
    servers: list[asyncio.Task[None]] = []
    failed = False
    try:
        servers = [await host.serve()]
        if save:
            save_credentials(cfg.api_url, host.token, cfg.gateway_url)
        parts = host.start_controllers()
        gc.freeze()
        if on_ready:
            on_ready(cfg.api_url, host.token)
        failed = await wait_for_stop([*servers, *parts])
    finally:
        await host.stop(servers)
    if failed:
        raise SystemExit("osless server stopped because a part of it failed (see the error above)")
