"""An app's logs: asked of every live node's API (`node/api.py`), merged by time, optionally followed.

Nodes keep their instances' logs on their own disk; the API asks them, showing each a reader token
of that app made for that node (`secrets.scoped_token`: its logs only, for a few minutes; the node
checks it with the API as any token), never the caller's own, and never keeps a copy. A node that
does not answer costs its lines, said in a record of their place, never the whole answer. What a
node sends is read in bounded records: a node cannot make the API buffer without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from osless.api.auth import Caller, require
from osless.api.errors import ApiError, responses
from osless.api.models import InstanceId, Node
from osless.api.openapi import LOG
from osless.api.state import ApiState, get_state
from osless.bounds import MAX_LINE_CHARS, MAX_NAME_CHARS, cap
from osless.logs import MAX_FIELD_CHARS, MAX_GREP_CHARS, MAX_REQUEST_CHARS, extra_fields
from osless.tokens import PLAIN

router = APIRouter(tags=["logs"])

# A record of a node: its line (at most MAX_LINE_CHARS, each at most 6 bytes as JSON) and the rest
# (its extra fields: a path and a logger's name of MAX_FIELD_CHARS each, and short ones).
MAX_RECORD_BYTES = (MAX_LINE_CHARS + 2 * MAX_FIELD_CHARS) * 6 + 4096
MAX_ERROR_BYTES = 4096  # of a node's refusal, shown in the notice
NODE_CONNECT_S = 3.0
NODE_TAIL_S = 20.0  # a whole tail answer, from the request to its last record
READER_TTL_S = 300.0  # the node checks it when a follow starts: a follow outlives it
# A follow asks this often whether its token is still good: revoked or expired, the follow ends (a
# dashboard's log tail would else go on reading as a token that no longer exists).
STILL_S = 5.0
FOLLOW_QUEUE = 256  # records read ahead of a slow client, per answer: past it, nodes wait
# What the merged tail holds at once, over all nodes: past it the oldest go, and a notice says so. A
# tail of 100k lines of 16k characters from each of many nodes would otherwise be gigabytes.
MAX_HELD_BYTES = 32 * 1024 * 1024
RECORD_OVERHEAD = 200  # a record's dict, floats and keys, roughly, besides its text
MAX_NODE_BYTES = 256 * 1024 * 1024  # read of one node's tail answer, records skipped or not
MAX_AT_LAST = 1000  # records kept per node at its last time, to skip them when the follow starts


def _size(rec: dict[str, Any]) -> int:
    extra = len(rec.get("logger", "")) + len(rec.get("access", {}).get("path", ""))
    return len(rec["line"]) + len(rec["source"]) + len(rec["stream"]) + extra + RECORD_OVERHEAD


class _Newest:
    """The newest `count` records over all nodes, and at most MAX_HELD_BYTES of them: a min-heap by
    time, whose oldest goes when either bound is passed. `cut`: some went for the bytes alone."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.heap: list[tuple[float, int, dict[str, Any]]] = []
        self.bytes = 0
        self.cut = 0
        self._seq = 0

    def add(self, rec: dict[str, Any]) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (rec["ts"], self._seq, rec))
        self.bytes += _size(rec)
        while len(self.heap) > self.count or self.bytes > MAX_HELD_BYTES:
            if len(self.heap) <= self.count:
                self.cut += 1
            self.bytes -= _size(heapq.heappop(self.heap)[2])

    def records(self) -> list[dict[str, Any]]:
        return [rec for _, _, rec in sorted(self.heap)]


class _Seen:
    """What the follow of a node skips: what its tail showed, told by its last time and the records at
    that time (at most MAX_AT_LAST of them)."""

    def __init__(self) -> None:
        self.last: float | None = None
        self.at_last: list[dict[str, Any]] = []

    def add(self, rec: dict[str, Any]) -> None:
        if self.last is None or rec["ts"] > self.last:
            self.last, self.at_last = rec["ts"], []
        if rec["ts"] == self.last and len(self.at_last) < MAX_AT_LAST:
            self.at_last.append(rec)


class _NodeFailed(Exception):
    """A node's logs could not be read; the message says why, for the notice."""


def _notice(line: str) -> dict[str, Any]:
    return {"ts": round(time.time(), 6), "source": "osless", "stream": "osless", "line": line}


def _record(raw: bytes) -> dict[str, Any] | None:
    """A node's line as a record the API passes on: its shape checked, its text capped."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):  # a nesting too deep, from a node taken over
        return None
    if not isinstance(rec, dict):
        return None
    ts, source, stream, line = (rec.get(k) for k in ("ts", "source", "stream", "line"))
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return None
    if not (isinstance(source, str) and isinstance(stream, str) and isinstance(line, str)):
        return None
    return {
        "ts": float(ts),
        "source": cap(source, MAX_NAME_CHARS),
        "stream": cap(stream, MAX_NAME_CHARS),
        "line": cap(line, MAX_LINE_CHARS),
        **extra_fields(rec),
    }


async def _lines(resp: httpx.Response) -> AsyncIterator[bytes | None]:
    """The lines of an NDJSON answer, none kept past MAX_RECORD_BYTES: a longer one is None (its
    rest skipped, unread into memory)."""
    buf = bytearray()
    skipping = False
    async for chunk in resp.aiter_bytes():
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not skipping:
                buf += piece
                if len(buf) > MAX_RECORD_BYTES:
                    buf.clear()
                    skipping = True
                    yield None
            if end < 0:
                break
            if skipping:
                skipping = False
            elif buf.strip():
                yield bytes(buf)
            buf.clear()
            start = end + 1
    if buf.strip() and not skipping:
        yield bytes(buf)


async def _refusal(resp: httpx.Response) -> str:
    """What a node that refused said, read no further than MAX_ERROR_BYTES."""
    body = b""
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BYTES:
            break
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode("utf-8", "replace")
    return f"it answered {resp.status_code}: {cap(str(message), 500)}"


async def _node_records(
    client: httpx.AsyncClient,
    node: Node,
    *,
    app: str,
    shown: dict[str, str],
    tail: int,
    follow: bool,
    instance: str | None,
    filters: dict[str, str],
) -> AsyncIterator[dict[str, Any]]:
    """The records a node's API answers, in its order; _NodeFailed if it does not answer. The node
    applies `filters` itself: what a reader does not want never crosses the network."""
    if not node.api:
        raise _NodeFailed("its heartbeat names no node API (a node of an earlier release?)")
    params = {"tail": str(tail), "follow": "true" if follow else "false", **filters}
    if instance:
        params["instance"] = instance
    try:
        async with client.stream(
            "GET", f"{node.api}/logs/apps/{app}", params=params, headers={"authorization": shown[node.name]}
        ) as resp:
            if resp.status_code != 200:
                raise _NodeFailed(await _refusal(resp))
            read = 0
            async for raw in _lines(resp):
                read += len(raw) if raw is not None else MAX_RECORD_BYTES
                if not follow and read > MAX_NODE_BYTES:
                    yield _notice(f"node {node.name} sent more than {MAX_NODE_BYTES} bytes: the rest dropped")
                    return
                rec = _record(raw) if raw is not None else None
                if rec is not None:
                    yield rec
                elif raw is None:
                    yield _notice(
                        f"node {node.name} sent a record longer than {MAX_RECORD_BYTES} bytes: dropped"
                    )
    except httpx.HTTPError as e:
        raise _NodeFailed(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def _missing(name: str, why: str) -> dict[str, Any]:
    return _notice(f"node {name} did not answer: its logs are missing here ({cap(why, 1000)})")


async def _tail_of(
    client: httpx.AsyncClient, node: Node, tail: int, newest: _Newest, seen: _Seen, **ask: Any
) -> dict[str, Any] | None:
    """A node's last `tail` records, into `newest` (and `seen`); or the notice that it did not answer.
    Records already in `newest` stay there whatever comes next."""
    got = 0
    try:
        async with asyncio.timeout(NODE_TAIL_S):
            async for rec in _node_records(client, node, tail=tail, follow=False, **ask):
                newest.add(rec)
                if rec["source"] != "osless":
                    seen.add(rec)
                got += 1
                if got >= tail:
                    break  # a node cannot send more than was asked
    except _NodeFailed as e:
        return _missing(node.name, str(e))
    except TimeoutError:
        return _missing(node.name, f"no whole answer in {NODE_TAIL_S:.0f}s")
    return None


async def _merged_tail(
    client: httpx.AsyncClient, nodes: list[Node], tail: int, **ask: Any
) -> tuple[list[dict[str, Any]], dict[str, _Seen], set[str]]:
    """The last `tail` records over all nodes by time (held within MAX_HELD_BYTES), then the notices
    of the nodes that did not answer; what each node's tail showed; the names of those that did not
    answer."""
    seen = {n.name: _Seen() for n in nodes}
    if tail == 0:
        return [], seen, set()
    newest = _Newest(tail)
    answers = await asyncio.gather(*(_tail_of(client, n, tail, newest, seen[n.name], **ask) for n in nodes))
    notices = [notice for notice in answers if notice is not None]
    failed = {n.name for n, notice in zip(nodes, answers, strict=True) if notice is not None}
    if newest.cut:
        notices.append(
            _notice(
                f"the {newest.cut} oldest of the lines asked for were left out: the API holds at most "
                f"{MAX_HELD_BYTES // (1024 * 1024)} MiB of a tail; ask a smaller --tail or one --instance"
            )
        )
    return newest.records() + notices, seen, failed


async def _follow_node(
    client: httpx.AsyncClient,
    node: Node,
    out: asyncio.Queue[dict[str, Any]],
    *,
    seen: _Seen,
    said: bool,
    tail: int,
    **ask: Any,
) -> None:
    """A node's records from after those already `seen` (its tail), into `out` as they come.

    The follow asks the same tail again, so that lines written between the two answers are not lost,
    and skips what was already shown: older than the last seen, or the same record at its time.
    `said`: the node's silence was already told; told again only if it answered in between.
    """
    last, at_last = seen.last, seen.at_last
    answered = False
    try:
        async for rec in _node_records(client, node, tail=tail, follow=True, **ask):
            answered = True
            if last is not None and (rec["ts"] < last or (rec["ts"] == last and rec in at_last)):
                continue
            await out.put(rec)
        why = "its stream ended (the node stopped?)"
    except _NodeFailed as e:
        why = str(e)
    if answered or not said:
        await out.put(_notice(f"node {node.name} stopped answering: its new lines are missing here ({why})"))


def _gone(nodes: list[Node], instances: list[Any], instance: str | None) -> list[dict[str, Any]]:
    """Notices for the instances placed on nodes that have no heartbeat any more: their logs went with
    their node."""
    live = {n.name for n in nodes}
    lost: dict[str, list[str]] = {}
    for i in instances:
        if i.node and i.node not in live and (instance is None or i.id == instance):
            lost.setdefault(i.node, []).append(i.id)
    return [
        _notice(
            f"node {name} is gone (no heartbeat): its logs are missing here, those of "
            f"{', '.join(sorted(ids)[:10])}{' and more' if len(ids) > 10 else ''} with them"
        )
        for name, ids in sorted(lost.items())
    ]


@router.get(
    "/apps/{app}/logs",
    response_class=StreamingResponse,
    responses={**LOG, **responses(404)},
    summary="NDJSON log records of the app's instances on every node, merged by time; follow=true streams",
)
async def app_logs(
    app: str,
    http: Request,
    tail: int = Query(default=100, ge=0, le=100_000),
    follow_: bool = Query(default=False, alias="follow"),
    instance: InstanceId | None = None,
    since: float | None = Query(
        default=None, gt=0, le=10 * 365 * 86400, description="only records of the last this many seconds"
    ),
    grep: str | None = Query(
        default=None,
        min_length=1,
        max_length=MAX_GREP_CHARS,
        description="only records whose line holds this text (a plain substring, case-sensitive)",
    ),
    request: str | None = Query(
        default=None,
        pattern=rf"^[A-Za-z0-9._-]{{1,{MAX_REQUEST_CHARS}}}$",
        description="only records of this request id (its access line, its `logging` records)",
    ),
    state: ApiState = Depends(get_state),
    caller: Caller = require("logs"),
) -> Any:
    if caller.role == "reader":  # what nodes are shown: theirs to check, never to ask again with
        raise ApiError(403, "forbidden", "a reader token opens a node's logs only, not this route")
    await state.resources.get_app(app)
    nodes, _ = await state.resources.list_nodes()
    instances, _ = await state.resources.list_instances(app=app)
    # Each node is shown a token that reads this app's logs on it alone, for a while, never the
    # caller's own: a node taken over would otherwise collect the tokens of whoever reads logs.
    shown = {
        n.name: f"Bearer {state.secrets.scoped_token('reader', app, READER_TTL_S, n.name)}" for n in nodes
    }
    filters = {"grep": grep or "", "request": request or ""}
    if since is not None:
        filters["since"] = repr(time.time() - since)  # the API's clock: nodes' are kept in step with it
    ask: dict[str, Any] = {
        "app": app,
        "shown": shown,
        "instance": instance,
        "filters": {k: v for k, v in filters.items() if v},
    }
    gone = _gone(nodes, instances, instance)

    async def stream() -> AsyncIterator[bytes]:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(None if follow_ else NODE_TAIL_S, connect=NODE_CONNECT_S)
        ) as client:
            first, by_node, failed = await _merged_tail(client, nodes, tail, **ask)
            for rec in first + gone:
                yield _line(rec)
            if not follow_:
                return
            queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(FOLLOW_QUEUE)
            readers = [
                asyncio.create_task(
                    _follow_node(
                        client,
                        n,
                        queue,
                        seen=by_node.get(n.name, _Seen()),
                        said=n.name in failed,
                        tail=tail,
                        **ask,
                    )
                )
                for n in nodes
            ]
            token = http.headers.get("authorization", "").partition(" ")[2].strip()
            checked = time.monotonic()
            try:
                while True:  # until the client goes: the server cancels this, and the readers with it
                    got: dict[str, Any] | None = None if queue.empty() else queue.get_nowait()
                    if got is None:
                        with contextlib.suppress(TimeoutError):
                            got = await asyncio.wait_for(queue.get(), STILL_S)
                    if got is not None:
                        yield _line(got)
                    if time.monotonic() - checked > STILL_S:
                        checked = time.monotonic()
                        if not await _still_good(state, token, caller):
                            return
            finally:
                for r in readers:
                    r.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.gather(*readers, return_exceptions=True)

    return StreamingResponse(stream(), media_type="application/x-ndjson")


async def _still_good(state: ApiState, token: str, caller: Caller) -> bool:
    """Whether the token a follow was opened with is still good: not expired, and, if the API keeps
    it, not revoked (scoped and apps' tokens end with their time)."""
    if caller.expires_at is not None and caller.expires_at <= time.time():
        return False
    if not token.startswith(PLAIN):
        return True
    found = await state.tokens.lookup(token)
    return found is not None and not found[1].expired()


def _line(rec: dict[str, Any]) -> bytes:
    return (json.dumps(rec) + "\n").encode()
