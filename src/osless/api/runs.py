"""One-off commands of an app, run on a node: what `osless run` (routes/runs.py) and release steps
(routes/builds.py) share.

The API picks a live node (one running the app's instances first: its volumes are there), records
the run under `/runs/{node}/{app}/{id}` on a lease (so that node may pull the release's image, and
runs per app are counted across servers), and opens the node API's `WS /runs/{app}` with a
`runner` token made for that node, never the caller's. The first frame tells the node what to run:
the release's image, the app's uid, the command, the timeout, and what an instance's environment
holds (the app's token, its config in clear). Then frames pass both ways (`runwire`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from osless import runwire
from osless.api.errors import ApiError
from osless.api.models import Node
from osless.api.state import ApiState
from osless.bounds import MAX_LINE_CHARS, cap

__all__ = [
    "MAX_RUNS_PER_APP",
    "RUNS",
    "NodeRun",
    "Target",
    "check_room",
    "images_run_on",
    "pick_node",
    "release_steps",
    "target",
]

RUNS = "/runs/"
MAX_RUNS_PER_APP = 4  # at once, over the fleet: past it, 429
RUNNER_TTL_S = 60.0  # the node checks it when the run starts only
# The record's lease, kept alive while the run goes: a server that dies takes its runs' records with
# it within this, so they no longer count against the app's runs.
LEASE_S = 30.0
NODE_CONNECT_S = 10.0


@dataclass
class Target:
    """What a command runs in: an app's release."""

    app: str
    release: int
    image: str
    uid: int
    manifest_release: list[str] = field(default_factory=list)  # its release steps


async def target(state: ApiState, app: str, release: int | None) -> Target:
    """The app's current release (or `release`): 404 no such app, 409 no release (yet) / no such one."""
    found = await state.resources.get_app(app)
    version = release if release is not None else found.current_release
    if not version:
        raise ApiError(409, "no_release", f"app {app!r} has no release yet: `osless deploy` it first")
    rel = await state.resources.get_release(app, version)
    return Target(app, version, rel.image, await state.resources.app_uid(app), list(rel.manifest.release))


async def images_run_on(state: ApiState, node: str) -> set[str]:
    """The images of the commands running on `node` now: that node may pull them."""
    kvs, _ = await state.resources.store.list(f"{RUNS}{node}/")
    out: set[str] = set()
    for kv in kvs:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.add(str(json.loads(kv.value)["image"]))
    return out


async def pick_node(state: ApiState, app: str) -> Node:
    """A live node with an API: one running the app's instances (and so its volumes) if any, else the
    first by name (the same one each time, so a volume written by one run is read by the next)."""
    nodes, _ = await state.resources.list_nodes()
    nodes = sorted((n for n in nodes if n.api), key=lambda n: n.name)
    if not nodes:
        raise ApiError(503, "no_node", "no live node can run the command now; try again once one joins")
    instances, _ = await state.resources.list_instances(app=app)
    hosting = {i.node for i in instances if i.node}
    return next((n for n in nodes if n.name in hosting), nodes[0])


async def check_room(state: ApiState, app: str) -> None:
    """429 if `app` runs MAX_RUNS_PER_APP commands already, on any node, started by any server."""
    kvs, _ = await state.resources.store.list(RUNS)
    if sum(1 for kv in kvs if kv.key.split("/")[3:4] == [app]) >= MAX_RUNS_PER_APP:
        raise ApiError(
            429, "too_many_runs", f"app {app!r} runs {MAX_RUNS_PER_APP} commands already; wait for one to end"
        )


class NodeRun:
    """One command on a node, as an async context manager: `send`, then read `frames()`."""

    def __init__(
        self,
        state: ApiState,
        tgt: Target,
        command: list[str],
        timeout_s: float,
        tty: tuple[int, int] | None = None,
    ) -> None:
        self.state = state
        self.tty = tty
        self.target = tgt
        self.command = command
        self.timeout_s = timeout_s
        self.node: Node | None = None
        self._ws: ClientConnection | None = None
        self._lease: int | None = None
        self._keeper: asyncio.Task[None] | None = None

    async def _keep(self, lease: int) -> None:
        while True:
            await asyncio.sleep(LEASE_S / 3)
            with contextlib.suppress(Exception):  # the store away a moment: the next try may do
                await self.state.resources.store.keepalive(lease)

    async def __aenter__(self) -> NodeRun:
        state, tgt = self.state, self.target
        await check_room(state, tgt.app)  # again: others may have started since the route looked
        node = self.node = await pick_node(state, tgt.app)
        store = state.resources.store
        self._lease = await store.grant_lease(LEASE_S)
        key = f"{RUNS}{node.name}/{tgt.app}/{secrets.token_hex(8)}"
        await store.put(key, json.dumps({"image": tgt.image}).encode(), lease=self._lease)
        self._keeper = asyncio.create_task(self._keep(self._lease))
        try:
            self._ws = await self._open(node)
        except BaseException:
            await self._release()
            raise
        return self

    async def _open(self, node: Node) -> ClientConnection:
        state, tgt = self.state, self.target
        token = state.secrets.scoped_token("runner", tgt.app, RUNNER_TTL_S, node.name)
        url = "ws" + str(node.api).removeprefix("http") + f"/runs/{tgt.app}"
        try:
            ws = await connect(
                url,
                additional_headers={"authorization": f"Bearer {token}"},
                max_size=runwire.MAX_FRAME,
                open_timeout=NODE_CONNECT_S,  # and pings (every 20 s) tell a node gone silently
            )
        except InvalidStatus as e:
            raise ApiError(
                502,
                "node_refused",
                f"node {node.name} refused the command: {_said(bytes(e.response.body or b''))}",
            ) from None
        except (OSError, TimeoutError, WebSocketException) as e:
            raise ApiError(502, "node_unreachable", f"node {node.name} could not be reached: {e}") from None
        cfg, _ = await state.resources.get_config(tgt.app)
        from osless.api.routes.config import reveal  # the route module imports this one's callers

        values = reveal(state, cfg.values)
        env = {
            "OSLESS_APP": tgt.app,
            "OSLESS_RELEASE": str(tgt.release),
            "OSLESS_TOKEN": state.secrets.app_token(tgt.app),
            "OSLESS_CONFIG": json.dumps({"values": values, "version": cfg.version}),
            "OSLESS_RUN": "1",
        }
        start = {
            "op": "start",
            "image": tgt.image,
            "uid": tgt.uid,
            "command": self.command,
            "env": env,
            "timeout_s": self.timeout_s,
            "tty": {"rows": self.tty[0], "cols": self.tty[1]} if self.tty else None,
        }
        await ws.send(json.dumps(start))
        return ws

    async def send_stdin(self, data: bytes) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(bytes([runwire.STDIN]) + data)

    async def send_op(self, op: str, **fields: int) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(json.dumps({"op": op, **fields}))

    async def frames(self) -> AsyncIterator[tuple[int, bytes] | dict[str, Any]]:
        """(STDOUT|STDERR, bytes) as they come, then the last message (`exit` or `error`); an error
        if the node went before it said how the command ended."""
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if isinstance(msg, bytes):
                    if msg[:1] in (bytes([runwire.STDOUT]), bytes([runwire.STDERR])):
                        yield msg[0], msg[1:]
                    continue
                with contextlib.suppress(ValueError):
                    end = json.loads(msg)
                    if isinstance(end, dict) and end.get("op") == "exit" and isinstance(end.get("code"), int):
                        yield {"op": "exit", "code": int(end["code"])}
                        return
                    if isinstance(end, dict) and end.get("op") == "error":
                        yield {
                            "op": "error",
                            "code": cap(str(end.get("code") or "node_error"), 64),
                            "message": cap(str(end.get("message") or ""), 2000),
                        }
                        return
        except ConnectionClosed:
            pass
        node = self.node.name if self.node else "?"
        yield {"op": "error", "code": "node_lost", "message": f"node {node} went before the command ended"}

    async def _release(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._lease is not None:
            lease, self._lease = self._lease, None
            with contextlib.suppress(Exception):
                await self.state.resources.store.revoke(lease)  # the record goes with it

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2)
        await self._release()


def _said(body: bytes | None) -> str:
    try:
        return cap(str(json.loads(body or b"")["error"]["message"]), 500)
    except (ValueError, KeyError, TypeError):
        return cap((body or b"").decode("utf-8", "replace"), 200) or "no reason given"


async def release_steps(
    state: ApiState, tgt: Target, commands: list[str], log: Callable[[list[str]], Awaitable[object]]
) -> str | None:
    """Run a new release's steps in order, each as `osless run` would in it, their output in `log`;
    None if each exited 0, else what failed (the first that did: the rest do not run)."""
    for command in commands:
        argv = ["/bin/sh", "-c", command]  # a shell command line, as a build step's
        await log([f"==> Release step: {command}"])
        lines = _Lines(log)
        end: dict[str, Any] = {"op": "error", "code": "node_lost", "message": "no answer"}
        try:
            async with NodeRun(state, tgt, argv, runwire.RELEASE_TIMEOUT_S) as node_run:
                await node_run.send_op("eof")  # nothing on stdin: it never waits for input
                async for frame in node_run.frames():
                    if isinstance(frame, dict):
                        end = frame
                        break
                    await lines.feed(frame[1])
        except ApiError as e:
            end = {"op": "error", "code": e.code, "message": e.message}
        await lines.flush()
        if end["op"] == "error":
            return f"release step `{cap(command, 200)}` could not run: {end['message']}"
        if end["code"] == runwire.TIMEOUT_EXIT:
            return (
                f"release step `{cap(command, 200)}` ran past {runwire.RELEASE_TIMEOUT_S:g} s "
                f"and was ended (exit code {end['code']})"
            )
        if end["code"] != 0:
            return f"release step `{cap(command, 200)}` exited with code {end['code']}"
    return None


class _Lines:
    """A command's output as log lines: cut at newlines (or at a log line's cap), sent per frame."""

    def __init__(self, log: Callable[[list[str]], Awaitable[object]]) -> None:
        self.log = log
        self.buf = bytearray()

    async def feed(self, data: bytes) -> None:
        self.buf += data
        *parts, rest = self.buf.split(b"\n")
        done = [bytes(p) for p in parts]
        self.buf = bytearray(rest)
        if len(self.buf) > MAX_LINE_CHARS:
            done.append(bytes(self.buf))
            self.buf.clear()
        if done:
            await self.log([line.decode("utf-8", "replace") for line in done])

    async def flush(self) -> None:
        if self.buf:
            await self.log([self.buf.decode("utf-8", "replace")])
            self.buf.clear()
