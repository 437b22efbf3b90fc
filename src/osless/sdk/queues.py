"""Queues: `@app.on_message("orders")` consumes `{app}.orders`; `osless.queue("orders").send(...)` sends.

A consumer is a function of the app (its name, the handler's) whose event is a batch of messages:
the platform pulls up to `batch_size` of them and calls it through the gateway like any function,
and the entry point here hands the handler `(messages, ctx)`. It returns: every message is done
(acknowledged). It raises (or times out, or its instance dies): every message of the batch is tried
again. Some failed: `raise osless.BatchFailed([ids])` (or return `{"failed": [ids]}`, as Lambda's
batchItemFailures): those are tried again, the others are done.

Sending goes out through the node's egress proxy like `osless.function(...).call()`:
`POST http://{app}.osless/__osless__/queues/{queue}/messages`, as this app (the proxy knows which
app speaks); the platform lets an app send to its own queues and to those it was granted
(`osless queue allow`). Stdlib only, as all the SDK: it runs inside instances.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from osless.sdk.errors import OslessError, UsageError, error_parts

__all__ = ["BatchFailed", "Message", "Queue", "QueueSendError", "consumer_entry", "queue"]

QUEUE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
APP_RE = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$|^[a-z]$")
MAX_BATCH_SEND = 100  # messages in one send_batch
SEND_TIMEOUT_S = 30.0
MAX_ANSWER = 1024 * 1024


class BatchFailed(OslessError):
    """Raised by a consumer: the messages of these ids failed (tried again); the rest are done."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids = [str(i) for i in ids]
        super().__init__(f"{len(self.ids)} message(s) of the batch failed")


class QueueSendError(OslessError):
    """A send failed: `status` (0 if nothing answered), `code` and the platform's message (403
    `not_allowed` says how to grant it)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Message:
    """One message as a consumer gets it: `body` is what was sent (any JSON), `attempt` counts from 1."""

    id: str
    body: Any
    attempt: int
    sent_at: float


def _messages(event: Any) -> list[Message]:
    raw = event.get("messages") if isinstance(event, dict) else None
    if not isinstance(raw, list):
        raise UsageError("a consumer is called by the platform with a batch of messages")
    return [
        Message(id=str(m["id"]), body=m.get("body"), attempt=int(m["attempt"]), sent_at=float(m["sent_at"]))
        for m in raw
    ]


def _outcome(returned: Any) -> dict[str, list[str]]:
    failed = returned.get("failed") if isinstance(returned, dict) else None
    return {"failed": [str(i) for i in failed]} if isinstance(failed, list | tuple) else {"failed": []}


def consumer_entry(handler: Callable[..., Any]) -> Callable[..., Any]:
    """The function the platform calls (event, ctx) for a consumer `handler(messages, ctx)`: its answer
    is `{"failed": [ids]}`, empty when all are done."""
    if inspect.iscoroutinefunction(handler):

        async def entry_async(event: Any, ctx: Any) -> dict[str, list[str]]:
            try:
                return _outcome(await handler(_messages(event), ctx))
            except BatchFailed as e:
                return {"failed": e.ids}

        return entry_async

    def entry(event: Any, ctx: Any) -> dict[str, list[str]]:
        try:
            return _outcome(handler(_messages(event), ctx))
        except BatchFailed as e:
            return {"failed": e.ids}

    return entry


@dataclass(frozen=True)
class Queue:
    """A queue by name: `send(body)` and `send_batch([bodies])` return the messages' ids."""

    app: str
    name: str

    @property
    def url(self) -> str:
        return f"http://{self.app}.osless/__osless__/queues/{self.name}/messages"

    def send(self, body: Any, *, timeout: float = SEND_TIMEOUT_S) -> str:
        """Send one message (anything JSON can carry); its id once the platform holds it durably."""
        return self.send_batch([body], timeout=timeout)[0]

    def send_batch(self, bodies: Iterable[Any], *, timeout: float = SEND_TIMEOUT_S) -> list[str]:
        """Send up to 100 messages at once; their ids, in order."""
        items = list(bodies)
        if not 0 < len(items) <= MAX_BATCH_SEND:
            raise UsageError(f"send_batch takes 1 to {MAX_BATCH_SEND} messages, not {len(items)}")
        try:
            data = json.dumps({"messages": [{"body": b} for b in items]}).encode()
        except (TypeError, ValueError) as e:
            raise UsageError(f"a message for {self.app}.{self.name} must be JSON: {e}") from e
        request = urllib.request.Request(
            self.url, data=data, method="POST", headers={"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                answer = json.loads(resp.read(MAX_ANSWER))
                return [str(i) for i in answer["ids"]]
        except urllib.error.HTTPError as e:
            raise _error(self, e.code, e.read(MAX_ANSWER)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise QueueSendError(
                0,
                "unreachable",
                f"cannot send to {self.app}.{self.name}: {reason} (queues are sent to this way from "
                "the code of an app running on osless, through its egress proxy)",
            ) from e

    async def asend(self, body: Any, *, timeout: float = SEND_TIMEOUT_S) -> str:
        return await asyncio.to_thread(self.send, body, timeout=timeout)

    async def asend_batch(self, bodies: Iterable[Any], *, timeout: float = SEND_TIMEOUT_S) -> list[str]:
        return await asyncio.to_thread(self.send_batch, list(bodies), timeout=timeout)


def _error(q: Queue, status: int, data: bytes) -> QueueSendError:
    return QueueSendError(status, *error_parts(status, data, f"sending to {q.app}.{q.name}"))


def queue(name: str) -> Queue:
    """A queue: `"orders"` is this app's own (`{app}.orders`), `"shop.orders"` another app's."""
    if not isinstance(name, str):
        raise UsageError(f"osless.queue({name!r}): give the queue's name, such as 'orders' or 'shop.orders'")
    app, _, q = name.rpartition(".")
    if not app:
        app = os.environ.get("OSLESS_APP", "")
    if not APP_RE.fullmatch(app) or not QUEUE_RE.fullmatch(q):
        raise UsageError(
            f"osless.queue({name!r}): name a queue as NAME (this app's) or APP.NAME, lowercase letters, "
            "digits, '_' and '-', such as osless.queue('orders')"
        )
    return Queue(app, q)
