"""Async invocations: accepted durably into JetStream, run by a dispatcher in every server, at least once.

- `submit`: the state (`queued`) written to the `invocations` bucket, then the invocation published
  to `osless.invoke.{app}.{fn}` and acknowledged by JetStream (file storage) before the API answers
  202. An idempotency key makes the id (a digest of app, function and key) and the message's
  `Nats-Msg-Id`: within the stream's duplicate window (24 h) the same key is accepted once, and the
  second answer is the first invocation.
- `Dispatcher`: a durable pull consumer (`dispatcher`) shared by all servers, so each message goes to
  one of them. Each invocation runs through the gateway exactly as a sync invoke does
  (`routes.invoke.call_function`); while it runs the message is kept ours (`in_progress`), so a
  server that dies mid-call lets another take it after `ACK_WAIT_S`. One app holds at most `PER_APP`
  of a server's `IN_FLIGHT` slots: its next one goes back to the stream for a while (not an attempt),
  so an app whose functions never end cannot starve the others' async work.
- Failures of the function (it raised: 500; its timeout: 504; its instance died: 502) count as
  attempts: retried after a backoff (`nak` with a delay) up to `retries` more times while younger than
  `max_age_s`; then `dead`, and the invocation with its error lands in the `DLQ` stream
  (`osless.dlq.{app}.{fn}`). The platform's own errors (no release yet, 503 while no instance can
  start, 429, the gateway unreachable) are retried the same way without counting, until `max_age_s`.
  A function gone from the app's release makes the invocation dead at once.
- States: queued, running, succeeded (with its `result`, at most `MAX_RESULT_BYTES`; a bigger one is
  dropped, saying so), failed (an attempt failed, another comes), dead. An invocation already final
  when delivered again is acked without running: one final state each.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import APIError as JetStreamAPIError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from osless.api.broker import INVOKE_STREAM, Broker
from osless.api.errors import ApiError
from osless.api.state import ApiState
from osless.bounds import cap
from osless.contracts import APP_NAME_PATTERN
from osless.sdk import traceparent

__all__ = [
    "FINAL",
    "MAX_EVENT_BYTES",
    "Dispatcher",
    "app_of",
    "encode",
    "engine_errors",
    "error_of",
    "get_invocation",
    "list_invocations",
    "raise_if_cancelled",
    "submit",
]

log = logging.getLogger("osless")

MAX_EVENT_BYTES = 256 * 1024  # as Lambda's async invocations
MAX_RESULT_BYTES = 256 * 1024
MAX_STATE_BYTES = 768 * 1024  # a state as stored: under the engine's 1 MiB a message
FINAL = ("succeeded", "dead")
STATES = ("queued", "running", "succeeded", "failed", "dead")
ACK_WAIT_S = 10.0  # a server gone mid-call: another takes its invocations after this
PROGRESS_S = 3.0
IN_FLIGHT = 32  # invocations one server runs at once
# Of them, one app's: an app whose invocations never end (or whose backlog is deep) must leave the
# other apps' async work slots of its own. Past it, the app's next one is put back for a while.
PER_APP = IN_FLIGHT // 2
PER_APP_WAIT_S = (0.5, 10.0)
BACKOFF_S = (0.5, 300.0)  # after a function's failure k: 0.5 * 4**(k-1) s, at most 5 min
PLATFORM_RETRY_S = (1.0, 30.0)
DURABLE = "dispatcher"
_ID = re.compile(APP_NAME_PATTERN.strip("^$") + "-[0-9a-f]{24}")


def _now() -> float:
    return round(time.time(), 3)


def new_id(app: str, function: str, idempotency_key: str | None) -> str:
    """`{app}-{hex}`: the app is in the id, so a state is found without a scan."""
    if idempotency_key is None:
        return f"{app}-{secrets.token_hex(12)}"
    digest = hashlib.sha256(f"{app}\0{function}\0{idempotency_key}".encode()).hexdigest()[:24]
    return f"{app}-{digest}"


def app_of(invocation_id: str) -> str:
    return invocation_id.rpartition("-")[0]


def _key(invocation_id: str) -> str:
    app, _, rest = invocation_id.rpartition("-")
    return f"{app}.{rest}"


def _valid_id(invocation_id: str) -> bool:
    """An app's name and 24 hex digits: nothing else may become a key (no `.`, `*` or `>` in it)."""
    return _ID.fullmatch(invocation_id) is not None


async def _read(broker: Broker, invocation_id: str) -> dict[str, Any] | None:
    assert broker.states is not None
    try:
        entry = await broker.states.get(_key(invocation_id))
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    value: dict[str, Any] = json.loads(entry.value)
    return value


def encode(value: object) -> bytes:
    """JSON as UTF-8, unescaped: json.dumps' escapes make 6 bytes of one (DEL, é) and an event or a
    result within its limit would pass the engine's (1 MiB a message). A lone surrogate (an app's
    result may hold one) has no UTF-8: then escaped."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value).encode()


async def _write(broker: Broker, state: dict[str, Any]) -> None:
    assert broker.states is not None
    state["updated_at"] = _now()
    await broker.states.put(_key(state["id"]), encode(state))


@contextlib.asynccontextmanager
async def engine_errors() -> AsyncIterator[None]:
    """The engine down or restarting (it is started again at once): a 503 saying so, nothing accepted."""
    try:
        yield
    except JetStreamAPIError as e:
        if "maximum" not in str(e.description or "").lower():  # not a cap of a stream: as below
            raise _unavailable(e) from e
        # A stream's cap (api/broker.py): new messages refused, none dropped.
        raise ApiError(
            429,
            "engine_full",
            f"the message engine takes no more of these now ({e.description}); retry once the "
            "backlog has gone down",
            headers={"retry-after": "5"},
        ) from e
    except (NatsError, TimeoutError) as e:
        raise _unavailable(e) from e


def _unavailable(e: Exception) -> ApiError:
    return ApiError(
        503,
        "message_engine_unavailable",
        f"the message engine did not answer ({type(e).__name__}); nothing was stored: try again shortly",
        headers={"retry-after": "1"},
    )


async def submit(
    broker: Broker, app: str, function: str, event: bytes, idempotency_key: str | None, trace: str = ""
) -> tuple[dict[str, Any], bool]:
    """The invocation, stored durably; whether it is new (False: the key's first one, answered again).
    `trace`: the caller's traceparent, checked, carried to the run (whose span is then its child)."""
    async with engine_errors():
        return await _submit(broker, app, function, event, idempotency_key, trace)


async def _submit(
    broker: Broker, app: str, function: str, event: bytes, idempotency_key: str | None, trace: str = ""
) -> tuple[dict[str, Any], bool]:
    assert broker.js is not None and broker.states is not None
    invocation_id = new_id(app, function, idempotency_key)
    now = _now()
    state: dict[str, Any] = {
        "id": invocation_id,
        "app": app,
        "function": function,
        "state": "queued",
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    earlier: int | None = None  # the revision of a state the key's earlier invocation left
    if idempotency_key is not None:
        try:
            await broker.states.create(_key(invocation_id), encode(state))
        except KeyWrongLastSequenceError:  # the key's first one: its state stays, if it is a duplicate
            with contextlib.suppress(KeyNotFoundError):
                earlier = (await broker.states.get(_key(invocation_id))).revision
    else:
        await broker.states.put(_key(invocation_id), encode(state))
    body = {"id": invocation_id, "app": app, "function": function, "event": event.decode(), "created_at": now}
    if traceparent.valid(trace.encode("latin-1", "replace")):
        body["traceparent"] = trace
    ack = await broker.js.publish(
        f"osless.invoke.{app}.{function}",
        encode(body),
        stream=INVOKE_STREAM,
        headers={"Nats-Msg-Id": invocation_id},
    )
    if ack.duplicate:
        return (await _read(broker, invocation_id)) or state, False
    if earlier is not None:
        # Past the duplicate window the key is new again, but the earlier one's state may outlive it
        # (its TTL counts from its last write): replaced, unless the dispatcher has written already.
        with contextlib.suppress(KeyWrongLastSequenceError):
            await broker.states.update(_key(invocation_id), encode(state), last=earlier)
    return state, True


async def get_invocation(broker: Broker, invocation_id: str) -> dict[str, Any]:
    async with engine_errors():
        found = await _read(broker, invocation_id) if _valid_id(invocation_id) else None
    if found is None:
        raise ApiError(
            404,
            "unknown_invocation",
            f"no invocation {invocation_id!r} (states are kept 24 h; "
            "list them with `osless invocations APP`)",
        )
    return found


async def list_invocations(broker: Broker, app: str, state: str | None, limit: int) -> list[dict[str, Any]]:
    """The app's newest `limit` invocations of the last 24 h, newest first, without their results
    (`get_invocation` has them)."""
    assert broker.states is not None
    async with engine_errors():
        return await _list(broker, app, state, limit)


# nats-py's watch can put its "initial values done" marker before values the server had already sent
# (in flight as it asked the consumer for its pending count: seen under load, a listing came back
# empty): a listing that opens on the marker waits this long for such values before it says none.
LATE_VALUES_S = 0.25


async def _list(broker: Broker, app: str, state: str | None, limit: int) -> list[dict[str, Any]]:
    assert broker.states is not None
    # A watch of the app's keys (a subject filter on the server): the latest value of each, then None.
    # A day of them may be millions: only the newest `limit` are held, and none with its result
    # (up to 256 KiB each), so what a listing holds is bounded by its `limit`, not by the traffic.
    watcher = await broker.states.watch(f"{app}.*", ignore_deletes=True)
    newest: list[tuple[float, str, dict[str, Any]]] = []  # a min-heap: the oldest kept on top
    seen = early_marker = False
    try:
        while True:
            try:
                # Past an early marker the last initial value has delta 0, and a quiet wait ends it.
                entry = await (
                    watcher.updates(LATE_VALUES_S)  # type: ignore[no-untyped-call]
                    if early_marker
                    else watcher.__anext__()  # type: ignore[no-untyped-call]
                )
            except (NatsTimeout, StopAsyncIteration):
                break
            if entry is None:
                if seen:
                    break
                early_marker = True
                continue
            if not isinstance(entry, KeyValue.Entry):
                break  # the watcher was stopped
            seen = True
            _keep(newest, entry, state, limit)
            if early_marker and entry.delta == 0:
                break
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return [item for _, _, item in sorted(newest, key=lambda r: r[:2], reverse=True)]


def _keep(
    newest: list[tuple[float, str, dict[str, Any]]], entry: KeyValue.Entry, state: str | None, limit: int
) -> None:
    """`entry`'s invocation among the newest `limit` (a min-heap: the oldest on top), if in `state`."""
    if not entry.value:
        return
    item = json.loads(entry.value)
    if state is not None and item.get("state") != state:
        return
    item.pop("result", None)
    ranked = (float(item.get("created_at", 0)), str(item.get("id", "")), item)
    if len(newest) < limit:
        heapq.heappush(newest, ranked)
    elif ranked[:2] > newest[0][:2]:
        heapq.heapreplace(newest, ranked)


def _text(text: str) -> str:
    """The app's text, capped, in UTF-8 (a lone surrogate replaced): the dead letter stays unescaped."""
    return cap(text).encode(errors="replace").decode()


def error_of(status: int, content: bytes) -> dict[str, Any]:
    """The function's error as the gateway answered it, capped (it is the app's text)."""
    try:
        error = json.loads(content)["error"]
        out: dict[str, Any] = {
            k: _text(str(error[k])) for k in ("code", "message", "type", "traceback") if k in error
        }
    except (ValueError, KeyError, TypeError, RecursionError):
        out = {"code": "error", "message": _text(content.decode(errors="replace"))}
    out["status"] = status
    return out


def _bad_result(e: Exception) -> bytes:
    message = f"the function's result is JSON the platform cannot read ({type(e).__name__}: {cap(str(e))})"
    return json.dumps({"error": {"code": "bad_result", "message": message}}).encode()


class Dispatcher:
    """Runs the invocations this server takes from the shared consumer, `IN_FLIGHT` at a time."""

    def __init__(self, state: ApiState, broker: Broker) -> None:
        self.state = state
        self.broker = broker
        self.slots = asyncio.Semaphore(IN_FLIGHT)
        self.running: set[asyncio.Task[None]] = set()
        self.per_app: dict[str, int] = {}

    async def run(self) -> None:
        assert self.broker.js is not None
        sub = await self.broker.js.pull_subscribe(
            "osless.invoke.>",
            durable=DURABLE,
            stream=INVOKE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S, max_ack_pending=10_000),
        )
        try:
            while True:
                await self.slots.acquire()
                try:
                    msgs = await sub.fetch(1, timeout=5)
                except Exception as e:
                    self.slots.release()
                    # A cancel that lands as the fetch times out may come back as its timeout (3.11's
                    # wait_for, nats-py's next_msg), and would keep the dispatcher, and a stop, going.
                    raise_if_cancelled()
                    if not isinstance(e, TimeoutError):
                        log.warning("dispatcher: %s", e)
                        await asyncio.sleep(1)
                    continue
                msg = msgs[0]
                app = msg.subject.split(".")[2]  # osless.invoke.{app}.{function}: names hold no dots
                if self.per_app.get(app, 0) >= PER_APP:
                    self.slots.release()
                    await self._later(msg)
                    continue
                self.per_app[app] = self.per_app.get(app, 0) + 1
                task = asyncio.create_task(self._one(msg))
                self.running.add(task)
                task.add_done_callback(functools.partial(self._done, app=app))
        finally:
            for t in self.running:
                t.cancel()

    async def _later(self, msg: Msg) -> None:
        """Its app has its share of the slots: back to the stream for a while (no attempt counted)."""
        tries = msg.metadata.num_delivered or 1
        with contextlib.suppress(Exception):  # not acked: it comes again after ACK_WAIT_S anyway
            await msg.nak(delay=min(PER_APP_WAIT_S[0] * 2 ** min(tries - 1, 8), PER_APP_WAIT_S[1]))

    def _done(self, task: asyncio.Task[None], *, app: str) -> None:
        self.running.discard(task)
        self.slots.release()
        left = self.per_app.pop(app, 1) - 1
        if left > 0:
            self.per_app[app] = left
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("dispatcher: an invocation's handling failed: %r", e, exc_info=e)

    async def _one(self, msg: Msg) -> None:
        progress = asyncio.create_task(self._keep(msg))
        try:
            await self._handle(msg)
        finally:
            progress.cancel()

    async def _keep(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _handle(self, msg: Msg) -> None:
        from osless.api.routes.invoke import call_function, find_function  # the routes import this module

        body = json.loads(msg.data)
        app, function, invocation_id = body["app"], body["function"], body["id"]
        state = await _read(self.broker, invocation_id)
        if state is None or state.get("created_at") != body["created_at"]:  # none, or the key's earlier one
            state = {
                "id": invocation_id,
                "app": app,
                "function": function,
                "attempts": 0,
                "created_at": body["created_at"],
            }
        elif state.get("state") in FINAL:  # delivered again after it ended (a server died before its ack)
            await msg.ack()
            return
        age = time.time() - body["created_at"]
        held = await self.state.resources.get_app_rev(app)
        if held is None:
            await self._forget(msg, invocation_id)
            return
        try:
            _, spec = await find_function(self.state, app, function)
        except ApiError as e:
            if e.code == "app_not_found":
                await self._forget(msg, invocation_id)
            elif e.status == 404:  # the function is gone: nothing will ever run it
                await self._dead(msg, state, body, {"code": e.code, "message": e.message, "status": 404})
            else:  # not deployed yet: the platform's, not counted
                await self._platform_retry(msg, state, body, e.code, e.message, age, 3600)
            return
        if age > spec.max_age_s:
            error = state.get("error") or {"code": "expired", "message": ""}
            error = {
                **error,
                "message": f"older than max_age_s={spec.max_age_s}; last: {error.get('message')}",
            }
            await self._dead(msg, state, body, error)
            return
        state["attempts"] = int(state.get("attempts", 0)) + 1
        state["state"] = "running"
        state["started_at"] = _now()  # this attempt's: with `finished_at`, how long it ran
        state.pop("error", None)
        await _write(self.broker, state)
        headers = {"x-osless-request-id": invocation_id, "traceparent": str(body.get("traceparent", ""))}
        try:
            resp = await call_function(self.state, app, function, spec, body["event"].encode(), headers)
            status, content = resp.status_code, resp.content
        except ApiError as e:
            status, content = e.status, json.dumps({"error": {"code": e.code, "message": e.message}}).encode()
            if e.code == "gateway_unreachable":
                status = 599  # the platform's
        got = await self.state.resources.get_app_rev(app)
        if got is None or got[0].uid != held[0].uid:  # deleted while it ran (a new app of the name?)
            await self._forget(msg, invocation_id)
            return
        if status == 200:
            try:
                result = json.loads(content or b"null") if len(content) <= MAX_RESULT_BYTES else None
            except (ValueError, RecursionError) as e:
                # The app's answer (an app may lift its own interpreter's limits): its attempt failed.
                # Left to raise, the invocation would be run again at every ack wait, without end.
                status, content = 500, _bad_result(e)
            else:
                state["state"] = "succeeded"
                state["finished_at"] = _now()
                state["result"] = result
                if len(content) > MAX_RESULT_BYTES:
                    state["result_dropped"] = f"{len(content)} bytes, past the {MAX_RESULT_BYTES} kept"
                elif (size := len(encode(state))) > MAX_STATE_BYTES:  # a result that grows as stored
                    state["result"] = None
                    state["result_dropped"] = f"{size} bytes as stored, past the {MAX_STATE_BYTES} kept"
                await _write(self.broker, state)
                await msg.ack()
                return
        error = error_of(status, content)
        if status in (500, 502, 504):  # the function's own failure: an attempt
            retries = spec.retries
            if state["attempts"] > retries:
                await self._dead(msg, state, body, error)
                return
            state["state"] = "failed"
            state["error"] = error
            await _write(self.broker, state)
            await msg.nak(delay=min(BACKOFF_S[0] * 4 ** (state["attempts"] - 1), BACKOFF_S[1]))
            return
        state["attempts"] -= 1  # the platform's failure: not the function's attempt
        await self._platform_retry(msg, state, body, error["code"], error["message"], age, spec.max_age_s)

    async def _platform_retry(
        self,
        msg: Msg,
        state: dict[str, Any],
        body: dict[str, Any],
        code: str,
        message: str,
        age: float,
        max_age: int,
    ) -> None:
        error = {"code": code, "message": message}
        if age > max_age:
            await self._dead(msg, state, body, error)
            return
        state["state"] = "queued"
        state["error"] = error
        await _write(self.broker, state)
        tries = msg.metadata.num_delivered or 1
        await msg.nak(delay=min(PLATFORM_RETRY_S[0] * 2 ** (tries - 1), PLATFORM_RETRY_S[1]))

    async def _forget(self, msg: Msg, invocation_id: str) -> None:
        """An invocation of an app deleted since it was accepted: the delete purged the app's states,
        dead letters and queued invocations (`queues.forget_app`), and this one's end must not bring
        its state or a dead letter back, for a new app of the name to list (or run again)."""
        assert self.broker.states is not None
        await self.broker.states.purge(_key(invocation_id))
        await msg.ack()

    async def _dead(
        self, msg: Msg, state: dict[str, Any], body: dict[str, Any], error: dict[str, Any]
    ) -> None:
        """Into the function's dead-letter queue (acknowledged there first), then the state, then the ack."""
        assert self.broker.js is not None
        state["state"] = "dead"
        state["error"] = error
        state["finished_at"] = _now()
        letter = {**body, "attempts": state.get("attempts", 0), "error": error, "died_at": _now()}
        await self.broker.js.publish(
            f"osless.dlq.{body['app']}.{body['function']}",
            encode(letter),
            headers={"Nats-Msg-Id": body["id"]},
        )
        await _write(self.broker, state)
        await msg.ack()


def raise_if_cancelled() -> None:
    """Raise the cancel a library turned into another error (its task is still being cancelled)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
