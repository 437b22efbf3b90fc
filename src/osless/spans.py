"""A span as the platform passes it on: what an instance writes (`runtime.tracing`), checked by the
node that keeps it (`node.traces`) and again by the API that merges nodes' (api/routes/traces.py).
The app writes it, so only the known fields, of the right types and sizes, are kept.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["PER_APP", "check_span"]

PER_APP = 2000  # spans kept per app on a node: at most ~4 KB each, 8 MB an app
MAX_TEXT = 256
MAX_ATTRS = 32
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_KINDS = frozenset({"internal", "server", "client", "producer", "consumer"})
_STATUSES = frozenset({"unset", "ok", "error"})


def _time(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if 0 <= value < 1e11 else None


def check_span(line: str) -> dict[str, Any] | None:
    """The span a line of an instance says, its fields checked and capped; None if it is not one."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict):
        return None
    trace_id, span_id, parent = rec.get("trace_id"), rec.get("span_id"), rec.get("parent_id")
    if not (isinstance(trace_id, str) and _HEX32.fullmatch(trace_id)):
        return None
    if not (isinstance(span_id, str) and _HEX16.fullmatch(span_id)):
        return None
    if parent is not None and not (isinstance(parent, str) and _HEX16.fullmatch(parent)):
        return None
    start, end = _time(rec.get("start")), _time(rec.get("end"))
    if start is None or end is None or end < start:
        return None
    name, kind, status = rec.get("name"), rec.get("kind"), rec.get("status")
    attrs = rec.get("attributes")
    kept: dict[str, str | int | float | bool] = {}
    if isinstance(attrs, dict):
        for k, v in list(attrs.items())[:MAX_ATTRS]:
            if isinstance(v, str):
                kept[str(k)[:MAX_TEXT]] = v[:MAX_TEXT]
            elif isinstance(v, bool | int) or (isinstance(v, float) and math.isfinite(v)):
                kept[str(k)[:MAX_TEXT]] = v
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "parent_id": parent,
        "name": name[:MAX_TEXT] if isinstance(name, str) else "",
        "kind": kind if kind in _KINDS else "internal",
        "start": start,
        "end": end,
        "status": status if status in _STATUSES else "unset",
        "attributes": kept,
    }
