"""`osless up`: every part of the platform on one machine, with state in SQLite.

The API serves the store; the scheduler, the node agent and the gateway processes are its clients
over HTTP, with the node token, exactly as they would be from other machines. The gateway runs in
processes of its own (`gateway.pool`), one per core; the rest share this process's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import re
import signal
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from osless.api.app import create_app
from osless.api.auth import Tokens, issue_token
from osless.api.migrations import MigrationError, Paths, backup_sqlite, migrate
from osless.api.resources import Resources
from osless.api.secrets import SecretBox, load_key
from osless.api.state import ApiState
from osless.build import Builder, ImageStore, stop_all_builds
from osless.build.egress import BuildEgress, index_hosts
from osless.cli.credentials import credentials_path
from osless.client import AsyncApi
from osless.controllers import run_controllers
from osless.gateway.pool import GatewayPool, default_count
from osless.node import NodeAgent, doctor, run_dir_for
from osless.node.egress_rules import Network
from osless.node.isolation import build_spec
from osless.store import SQLiteStore

__all__ = ["UpConfig", "run", "save_credentials"]

log = logging.getLogger("osless")


@dataclass
class UpConfig:
    data_dir: Path
    api_port: int = 7070
    http_port: int = 8080
    host: str = "127.0.0.1"
    gateways: int = field(default_factory=default_count)  # gateway processes sharing http_port
    node_name: str = field(default_factory=lambda: default_node_name())
    max_upload_mb: int = 100
    save_credentials: bool = True
    sandbox: bool = True
    secret_key_file: Path | None = None
    # Internal ranges apps may reach when they list them (`--egress-allow`); everything internal is
    # refused otherwise, whatever an app lists (`node/egress_rules`).
    egress_allow: list[Network] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


def default_node_name() -> str:
    """The host name, made fit for a node name (lowercase letters, digits, '.' and '-')."""
    return re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.")[:80] or "node"


def save_credentials(api: str, token: str, gateway: str) -> Path:
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api": api, "token": token, "gateway": gateway}, f)
    os.replace(tmp, path)
    return path


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `run`, which stops every part together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def _admin_token(resources: Resources, data_dir: Path) -> str:
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


async def _node_token(resources: Resources, node: str) -> str:
    """A fresh token for this node's agent each start; the previous one is revoked."""
    tokens = Tokens(resources.store)
    for digest, record in await tokens.list():
        if record.role == "node" and record.name == f"node:{node}":
            await tokens.revoke(digest)
    return await issue_token(resources, f"node:{node}", role="node")


def _private(data_dir: Path) -> None:
    """Nothing the platform writes is for other local users: state, tokens, keys, app code, logs.

    The umask covers every file and folder made from here on (sandboxes set their own, for the roots
    they build); the data dir itself, and the files an older version made readable, are fixed here.
    Image layers stay readable by all inside (their own modes, set when sealed): sandboxes bind each
    one at its own path as an unprivileged uid, which never needs to cross the data dir.
    """
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    for name in ("state.db", "state.db-wal", "state.db-shm", "admin-token", "secret.key"):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).chmod(0o600)


async def run(cfg: UpConfig, on_ready: Callable[[str, str, str], None] | None = None) -> None:
    """Start everything, call `on_ready(api_url, gateway_url, token)`, run until SIGINT/SIGTERM."""
    data_dir = cfg.data_dir.resolve()
    _private(data_dir)
    store = SQLiteStore(data_dir / "state.db")
    await store.start()
    run_dir = run_dir_for(data_dir)
    try:
        # Before anything reads the store: what an earlier release wrote is brought to this code's shapes.
        await migrate(store, Paths(data_dir, run_dir), backup=functools.partial(backup_sqlite, store.path))
    except MigrationError as e:
        await store.close()
        raise SystemExit(f"osless up: {e}") from None
    except BaseException:
        await store.close()
        raise
    resources = Resources(store)
    token = await _admin_token(resources, data_dir)
    images = ImageStore(data_dir / "images")
    images.clean_tmp()
    protections = doctor.check()
    missing = {p.name: p.detail for p in protections if not p.ok}
    for name, detail in missing.items():
        log.warning("PROTECTION MISSING on this host: %s (%s)", name, detail)
    sandboxed = cfg.sandbox and not any(name in missing for name in doctor.REQUIRED)
    if not sandboxed:
        log.warning(
            "APPS RUN WITHOUT A SANDBOX, their builds included: %s",
            "turned off by --no-sandbox"
            if not cfg.sandbox
            else "this host lacks " + ", ".join(n for n in doctor.REQUIRED if n in missing),
        )
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    build_sandbox = functools.partial(build_spec, data_dir=data_dir, run_dir=run_dir) if sandboxed else None
    # Builds reach the package index only, through an egress proxy of their own (`build.egress`).
    build_egress = (
        BuildEgress(run_dir / "build-egress", hosts=index_hosts(os.environ), allow=cfg.egress_allow)
        if sandboxed
        else None
    )
    secrets = SecretBox(load_key(data_dir, cfg.secret_key_file))
    node_token = await _node_token(resources, cfg.node_name)
    state = ApiState(
        secrets=secrets,
        resources=resources,
        images=images,
        builder=Builder(
            images, sandbox=build_sandbox, egress=build_egress, cache_dir=data_dir / "cache" / "uv"
        ),
        data_dir=data_dir,
        gateway_url=cfg.gateway_url,
        max_upload_bytes=cfg.max_upload_mb * 1024 * 1024,
    )
    uv_log = "warning"
    api_server = _Server(
        uvicorn.Config(
            create_app(state),
            host=cfg.host,
            port=cfg.api_port,
            log_level=uv_log,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,  # open log follows and watches must not hold shutdown
        )
    )
    client = AsyncApi(cfg.api_url, node_token)  # the parts act as this node, not as the admin
    gateways = GatewayPool(
        api_url=cfg.api_url,
        token=node_token,
        node=cfg.node_name,
        host=cfg.host,
        port=cfg.http_port,
        count=cfg.gateways,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    servers = [asyncio.create_task(api_server.serve(), name="the API server")]
    failed = False
    parts: list[asyncio.Task[None]] = []
    try:
        try:
            gateways.reserve()
        except OSError as e:
            raise SystemExit(
                f"could not listen on {cfg.host}:{cfg.http_port}: {e.strerror or e} "
                "(port in use? pass --http-port)"
            ) from None
        while not api_server.started:
            if any(t.done() for t in servers):
                for t in servers:
                    if t.done() and t.exception():
                        raise t.exception()  # type: ignore[misc]
                raise SystemExit(
                    f"could not listen on {cfg.host}:{cfg.api_port} (port in use? pass --api-port)"
                )
            await asyncio.sleep(0.01)
        try:
            await gateways.start()
        except RuntimeError as e:
            raise SystemExit(f"the gateway could not start: {e}") from None
        agent = NodeAgent(
            client,
            name=cfg.node_name,
            data_dir=data_dir,
            gateway=(cfg.host, cfg.http_port),
            sandbox=sandboxed,
            protections=protections,
            egress_allow=cfg.egress_allow,
        )
        parts = [
            # One candidate among any controller processes run against this API: the leader acts.
            asyncio.create_task(run_controllers(client), name="the controllers"),
            asyncio.create_task(gateways.run(), name="the gateway processes"),
            asyncio.create_task(agent.run(), name="the node agent"),
            asyncio.create_task(state.collector.run(), name="the collector"),
        ]
        # What start-up built lives as long as the process: out of the collector's way, so that a
        # collection triggered by requests does not walk it each time.
        gc.freeze()
        if cfg.save_credentials:
            save_credentials(cfg.api_url, token, cfg.gateway_url)
        if on_ready:
            on_ready(cfg.api_url, cfg.gateway_url, token)
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, *servers, *parts], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        # A part that ended on its own is a failure: say which, loudly, and exit nonzero.
        for task in [*servers, *parts]:
            if task.done() and not task.cancelled():
                error = task.exception()
                log.error("%s stopped: %r", task.get_name(), error, exc_info=error)
                failed = True
    finally:
        stop_all_builds()  # a build in flight fails now rather than hold the shutdown
        if build_egress is not None:
            build_egress.close()
        for t in parts:
            t.cancel()
        await asyncio.gather(*parts, return_exceptions=True)
        await gateways.stop()
        api_server.should_exit = True
        await asyncio.gather(*servers, return_exceptions=True)
        await client.aclose()
        await store.close()
    if failed:
        raise SystemExit("osless stopped because a part of it failed (see the error above)")
