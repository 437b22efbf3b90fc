"""Queue consumers' delivery: in every server, a loop per consumer of each app's current release.

`Consumers` follows the apps (every `RECONCILE_S`): each `@app.on_message` of an app's current
release gets its durable pull consumer (api/queues.py, shared by all servers, so a message goes to
one of them) and here a `_Loop`, which pulls up to `batch_size` messages at a time, at most
`max_concurrency` batches at once, and calls the consumer's function through the gateway exactly as
an invocation does (`routes.invoke.call_function`, as the invocations' `Dispatcher`): an app at zero
is woken by the activator as by an HTTP request. The gateway sends it to the current release's
instances; a deploy or rollback changes the loop's settings, never the messages, and a batch is in
one release's hands at a time (a message is out to one handler until acked, nakked or past its ack
wait, the visibility timeout plus `ACK_MARGIN_S`; a batch out when a deploy changes the settings
stays with its handler until that ends).

Each message's outcome: the handler returned (200) and did not name it in `{"failed": [...]}`: acked.
It failed (raised: 500, timed out: 504, its instance died: 502, any other but the platform's own, or
named failed): tried again after a backoff, and once it has been delivered `1 + retries` times,
published to the queue's DLQ with the error and acked. While a batch is handled here it is kept ours
(`in_progress`, every half ack wait): a wake from zero plus a long handler must not outlast the ack
wait and hand the batch to a second handler; a server that dies lets it go after the ack wait.
The platform's own failures (`PLATFORM_FAILURES`) are tried again here, the batch held, counting no
attempt. A batch past `MAX_BATCH_BYTES` goes in parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from nats.aio.msg import Msg

from osless.api import queues
from osless.api.broker import QUEUE_STREAM, Broker
from osless.api.errors import ApiError
from osless.api.invocations import BACKOFF_S, PLATFORM_RETRY_S, encode, error_of, raise_if_cancelled
from osless.api.state import ApiState
from osless.contracts import ConsumerManifest, FunctionManifest

__all__ = ["Consumers"]

log = logging.getLogger("osless")

RECONCILE_S = 1.0
FETCH_WAIT_S = 5.0
# The platform's own answers (too busy, no instance could start, not deployed or gone, the gateway
# unreachable): tried again without counting. Any other but 200 is the batch's failure.
PLATFORM_FAILURES = (404, 409, 429, 503, 599)
MAX_FAILED_IDS = 1000
# Calls out at once from one server: the API's one client to the gateways holds 100 connections,
# shared with every sync invoke and the dispatcher's 32. Without a cap, one app's consumers
# (max_concurrency 100, handlers that never return) took them all: every app's calls waited.
MAX_CALLS = 48
MAX_CALLS_PER_APP = 16
# One call's batch at most this big (the API's and Lambda's limit on a synchronous event): a batch
# of big messages is handed over in parts, one after another.
MAX_BATCH_BYTES = 6 * 1024 * 1024 - 64 * 1024


def _parts(msgs: list[Msg]) -> list[list[Msg]]:
    parts: list[list[Msg]] = [[]]
    size = 0
    for m in msgs:
        n = len(m.data or b"") + 200
        if parts[-1] and size + n > MAX_BATCH_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(m)
        size += n
    return parts


class _Share:
    """This server's calls of consumers: at most MAX_CALLS at once, MAX_CALLS_PER_APP of one app's."""

    def __init__(self) -> None:
        self.total = asyncio.Semaphore(MAX_CALLS)
        self.apps: dict[str, asyncio.Semaphore] = {}

    @contextlib.asynccontextmanager
    async def call(self, app: str) -> AsyncIterator[None]:
        # The app's own slot first: an app waiting for its share holds none of the others'.
        async with self.apps.setdefault(app, asyncio.Semaphore(MAX_CALLS_PER_APP)), self.total:
            yield


class _Loop:
    """One consumer's deliveries from this server."""

    def __init__(
        self,
        state: ApiState,
        broker: Broker,
        app: str,
        function: str,
        spec: ConsumerManifest,
        fn: FunctionManifest,
        share: _Share,
    ) -> None:
        self.state, self.broker, self.share = state, broker, share
        self.app, self.function, self.spec, self.fn = app, function, spec, fn
        self.running: set[asyncio.Task[None]] = set()
        self.retired = False

    async def run(self) -> None:
        assert self.broker.js is not None
        while True:
            try:
                await queues.ensure_consumer(self.broker, queues.consumer_config(self.app, self.spec))
                sub = await self.broker.js.pull_subscribe_bind(
                    queues.consumer_name(self.app, self.spec.queue), stream=QUEUE_STREAM
                )
                break
            except Exception as e:
                raise_if_cancelled()
                log.warning("consumer %s.%s: %s", self.app, self.spec.queue, e)
                await asyncio.sleep(1)
        slots = asyncio.Semaphore(self.spec.max_concurrency)
        try:
            while True:
                await slots.acquire()
                try:
                    msgs = await sub.fetch(self.spec.batch_size, timeout=FETCH_WAIT_S)
                except Exception as e:
                    slots.release()
                    raise_if_cancelled()
                    if not isinstance(e, TimeoutError):
                        log.warning("consumer %s.%s: %s", self.app, self.spec.queue, e)
                        await asyncio.sleep(1)
                    continue
                task = asyncio.create_task(self._batch(msgs))
                self.running.add(task)

                def done(t: asyncio.Task[None]) -> None:
                    self.running.discard(t)
                    slots.release()
                    if not t.cancelled() and (e := t.exception()) is not None:
                        log.error(
                            "consumer %s.%s: a batch's handling failed: %r", self.app, self.spec.queue, e
                        )

                task.add_done_callback(done)
        finally:
            if not self.retired:
                for t in self.running:
                    t.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def retire(self) -> None:
        """Its settings changed (a deploy): it fetches no more, but its batches out stay in the old
        release's hands until their handlers end (nakked at once, each would go to a second handler
        while the first still runs); let go past the handler's time, if the platform holds them."""
        self.retired = True
        later = asyncio.get_running_loop().call_later
        for t in list(self.running):
            later(self.spec.visibility_timeout_s + queues.ACK_MARGIN_S, t.cancel)

    def _event(self, msgs: list[Msg]) -> bytes:
        """The batch as the consumer's entry point reads it; each body is the JSON it was sent as."""
        parts = []
        for m in msgs:
            headers = m.headers or {}
            head = json.dumps(
                {
                    "id": headers.get(queues.ID_HEADER, ""),
                    "attempt": m.metadata.num_delivered or 1,
                    "sent_at": float(headers.get(queues.SENT_HEADER, 0) or 0),
                }
            )
            parts.append(head[:-1].encode() + b', "body": ' + (m.data or b"null") + b"}")
        return (
            b'{"queue": '
            + json.dumps(self.spec.queue).encode()
            + b', "messages": ['
            + b", ".join(parts)
            + b"]}"
        )

    async def _batch(self, msgs: list[Msg]) -> None:
        done = False
        try:
            for part in _parts(msgs):
                await self._call(part)
            done = True
        finally:
            if not done:  # cancelled (the consumer moved, or this server stops): at once to another
                for m in msgs:
                    with contextlib.suppress(Exception):
                        await m.nak()

    async def _call(self, msgs: list[Msg]) -> None:
        keeper = asyncio.create_task(self._keep(msgs))
        try:
            await self._handle(msgs)
        finally:
            keeper.cancel()

    async def _keep(self, msgs: list[Msg]) -> None:
        while True:
            await asyncio.sleep((self.spec.visibility_timeout_s + queues.ACK_MARGIN_S) / 2)
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.in_progress()

    async def _handle(self, msgs: list[Msg]) -> None:
        from osless.api.routes.invoke import call_function  # the routes import the API's modules

        event = self._event(msgs)
        tries = 0
        while True:
            try:
                async with self.share.call(self.app):
                    resp = await call_function(self.state, self.app, self.function, self.fn, event, {})
                status, content = resp.status_code, resp.content
            except ApiError as e:
                status = 599 if e.code == "gateway_unreachable" else e.status
                content = json.dumps({"error": {"code": e.code, "message": e.message}}).encode()
            if status not in PLATFORM_FAILURES:
                break
            # The platform's: held (not an attempt) and tried again, until it answers or the consumer
            # is gone from the current release (its loop is then cancelled).
            tries += 1
            log.info(
                "consumer %s.%s: the platform answered %s; trying again", self.app, self.spec.queue, status
            )
            await asyncio.sleep(min(PLATFORM_RETRY_S[0] * 2 ** min(tries - 1, 5), PLATFORM_RETRY_S[1]))
        failed, error = self._outcome(msgs, status, content)
        for m in msgs:
            if (m.headers or {}).get(queues.ID_HEADER, "") not in failed:
                await m.ack()
            elif (m.metadata.num_delivered or 1) > self.spec.retries:
                await self._dead(m, error)
            else:
                attempt = m.metadata.num_delivered or 1
                await m.nak(delay=min(BACKOFF_S[0] * 4 ** (attempt - 1), BACKOFF_S[1]))

    def _outcome(self, msgs: list[Msg], status: int, content: bytes) -> tuple[set[str], dict[str, Any]]:
        """The ids that failed, and the error they die with if it was their last try."""
        every = {(m.headers or {}).get(queues.ID_HEADER, "") for m in msgs}
        if status != 200:
            return every, error_of(status, content)
        try:
            named = json.loads(content).get("failed") or []
        except (ValueError, AttributeError, RecursionError):
            named = []
        failed = {str(i) for i in named[:MAX_FAILED_IDS]} & every if isinstance(named, list) else set()
        return failed, {
            "code": "batch_item_failed",
            "message": "the handler reported it failed",
            "status": 200,
        }

    async def _dead(self, m: Msg, error: dict[str, Any]) -> None:
        """Into the queue's DLQ (acknowledged there first), then acked here."""
        assert self.broker.js is not None
        headers = m.headers or {}
        try:
            body = json.loads(m.data or b"null")
        except ValueError:
            body = None
        letter = {
            "id": headers.get(queues.ID_HEADER, ""),
            "app": self.app,
            "queue": self.spec.queue,
            "body": body,
            "sent_at": float(headers.get(queues.SENT_HEADER, 0) or 0),
            "attempts": m.metadata.num_delivered or 1,
            "error": error,
            "died_at": round(time.time(), 3),
        }
        await self.broker.js.publish(queues.dlq_subject(self.app, self.spec.queue, "queue"), encode(letter))
        await m.ack()


class Consumers:
    """The loops of this server: one per consumer of each app's current release."""

    def __init__(self, state: ApiState, broker: Broker) -> None:
        self.state = state
        self.broker = broker
        self.loops: dict[tuple[str, str], tuple[Any, asyncio.Task[None], _Loop]] = {}
        self.share = _Share()
        # (app, release) -> its consumers: a release never changes, so it is read once
        self.releases: dict[tuple[str, int], dict[str, tuple[ConsumerManifest, FunctionManifest]]] = {}

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.reconcile()
                except Exception as e:
                    raise_if_cancelled()
                    log.warning("consumers: %s", e)
                await asyncio.sleep(RECONCILE_S)
        finally:
            for _, task, _ in self.loops.values():
                task.cancel()

    async def wanted(self) -> dict[tuple[str, str], tuple[str, ConsumerManifest, FunctionManifest]]:
        """(app, queue) -> (function, consumer, function spec) of every app's current release."""
        res = self.state.resources
        apps, _ = await res.list_apps()
        out: dict[tuple[str, str], tuple[str, ConsumerManifest, FunctionManifest]] = {}
        current = {(a.name, a.current_release) for a in apps if a.current_release is not None}
        for key in set(self.releases) - current:
            del self.releases[key]
        for app, release in current:
            if (app, release) not in self.releases:
                try:
                    manifest = (await res.get_release(app, release)).manifest
                except ApiError:
                    continue
                self.releases[(app, release)] = {
                    fn: (spec, manifest.functions[fn])
                    for fn, spec in manifest.consumers.items()
                    if fn in manifest.functions
                }
            for fn, (spec, fn_spec) in self.releases[(app, release)].items():
                out[(app, spec.queue)] = (fn, spec, fn_spec)
        return out

    async def reconcile(self) -> None:
        wanted = await self.wanted()
        for key, (config, task, old) in list(self.loops.items()):
            if wanted.get(key) != config or task.done():
                if key in wanted:  # changed, not gone: what it holds ends where it began
                    old.retire()
                task.cancel()
                del self.loops[key]
        for gone in set(self.share.apps) - {app for app, _ in wanted}:
            del self.share.apps[gone]  # a batch still out holds its own, released into nothing
        for key, config in wanted.items():
            if key not in self.loops:
                fn, spec, fn_spec = config
                loop = _Loop(self.state, self.broker, key[0], fn, spec, fn_spec, self.share)
                self.loops[key] = (
                    config,
                    asyncio.create_task(loop.run(), name=f"consumer {key[0]}.{key[1]}"),
                    loop,
                )
