"""An app's recent traces, without a collector: the spans its instances made, asked of every live
node's API (`node/api.py`, `node/traces.py`) and put together by trace.

As for logs, each node is shown a reader token of that app made for that node, never the caller's
own; a node that does not answer costs its spans, said in `missing`. What a node sends is the app's
own (an instance writes its spans): its answer is read up to MAX_NODE_BYTES and each span checked
again (`node.traces.check_span`) before it is passed on.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Query

from osless.api.auth import Caller, require
from osless.api.errors import ApiError, responses
from osless.api.models import Node
from osless.api.state import ApiState, get_state
from osless.bounds import cap
from osless.spans import PER_APP, check_span

router = APIRouter(tags=["logs"])

READER_TTL_S = 60.0
NODE_CONNECT_S = 3.0
NODE_WAIT_S = 10.0
MAX_NODE_BYTES = PER_APP * 5000  # a node's whole window of an app, each span under 4 KiB as JSON
MAX_TRACES = 100
TraceId = Annotated[str | None, Query(pattern=r"^[0-9a-f]{32}$", description="One trace, by its id")]


async def _node_spans(client: httpx.AsyncClient, node: Node, app: str, token: str, trace: str | None) -> Any:
    """The spans a node holds of `app` (checked), or why it did not answer (a str)."""
    if not node.api:
        return "its heartbeat names no node API"
    params = {"trace": trace} if trace else {}
    try:
        async with client.stream(
            "GET", f"{node.api}/traces/apps/{app}", params=params, headers={"authorization": token}
        ) as resp:
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_NODE_BYTES:
                    return f"it sent more than {MAX_NODE_BYTES} bytes"
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    try:
        found = json.loads(body)
        if resp.status_code != 200:
            return f"it answered {resp.status_code}: {cap(str(found['error']['message']), 500)}"
        raw = found["spans"]
    except (ValueError, KeyError, TypeError):
        return f"it answered {resp.status_code}, not spans"
    spans = []
    for item in raw[:PER_APP] if isinstance(raw, list) else []:
        span = check_span(json.dumps(item)) if isinstance(item, dict) else None
        if span is not None:
            span["app"], span["instance"] = app, cap(str(item.get("instance", "")), 100)
            span["node"] = node.name
            spans.append(span)
    return spans


def traces_of(spans: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Spans grouped by trace, newest trace first: each with its start, duration and its root's name
    (the span whose parent is not among them, the earliest if several)."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        by_trace.setdefault(s["trace_id"], []).append(s)
    out = []
    for trace_id, items in by_trace.items():
        items.sort(key=lambda s: s["start"])
        ids = {s["span_id"] for s in items}
        roots = [s for s in items if s["parent_id"] not in ids]
        start, end = items[0]["start"], max(s["end"] for s in items)
        out.append(
            {
                "trace_id": trace_id,
                "start": start,
                "duration_ms": round((end - start) * 1000, 3),
                "root": (roots or items)[0]["name"],
                "spans": items,
            }
        )
    out.sort(key=lambda t: t["start"], reverse=True)
    return out[:limit]


@router.get(
    "/apps/{app}/traces",
    responses=responses(403, 404, 422),
    summary="The app's recent traces: the spans its instances made, from every node, grouped by trace",
)
async def app_traces(
    app: str,
    trace: TraceId = None,
    limit: int = Query(default=20, ge=1, le=MAX_TRACES),
    state: ApiState = Depends(get_state),
    caller: Caller = require("logs"),
) -> dict[str, Any]:
    if caller.role == "reader":  # what nodes are shown: theirs to check, never to ask again with
        raise ApiError(403, "forbidden", "a reader token opens a node's traces only, not this route")
    await state.resources.get_app(app)
    nodes, _ = await state.resources.list_nodes()
    timeout = httpx.Timeout(NODE_WAIT_S, connect=NODE_CONNECT_S)
    async with httpx.AsyncClient(timeout=timeout) as client:
        answers = await asyncio.gather(
            *(
                _node_spans(
                    client,
                    n,
                    app,
                    f"Bearer {state.secrets.scoped_token('reader', app, READER_TTL_S, n.name)}",
                    trace,
                )
                for n in nodes
            )
        )
    spans: list[dict[str, Any]] = []
    missing = []
    for node, answer in zip(nodes, answers, strict=True):
        if isinstance(answer, str):
            missing.append({"node": node.name, "message": f"node {node.name} did not answer: {answer}"})
        else:
            spans.extend(answer)
    return {"traces": traces_of(spans, limit), "missing": missing}
