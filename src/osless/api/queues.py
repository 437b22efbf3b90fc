"""Queues in the message engine: what is sent, what waits, what died, and what goes with a deleted app.

The queue `orders` of the app `shop` is `shop.orders`: the subject `osless.queue.shop.orders` of the one
stream `QUEUES` (api/broker.py), consumed by the durable pull consumer `q_shop_orders` (api/consumers.py)
that its release's `@app.on_message("orders")` declares. One stream for every queue, not one each: a
stream is a unit the engine keeps state, files and (clustered) a Raft group for, made and updated by
every server at start; a subject is free, appears with its first message and goes with a purge by
subject; the per-queue caps are the stream's per-subject ones (`max_msgs_per_subject`, refusing new
messages when full). A message is its JSON body as sent, its id and sending time in headers.
Dead letters go to the `DLQ` stream as `osless.qdlq.{app}.{queue}` (functions': `osless.dlq.{app}.{fn}`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, BadRequestError, NotFoundError

from osless.api.broker import DLQ_STREAM, INVOKE_STREAM, QUEUE_STREAM, STATE_BUCKET, Broker
from osless.api.errors import ApiError
from osless.api.invocations import encode, engine_errors
from osless.contracts import ConsumerManifest

__all__ = [
    "ACK_MARGIN_S",
    "MAX_MESSAGE_BYTES",
    "consumer_config",
    "consumer_name",
    "dead_letters",
    "dlq_subject",
    "ensure_consumer",
    "forget_app",
    "peek",
    "purge_dead",
    "send",
    "stats",
    "subject",
]

MAX_MESSAGE_BYTES = 256 * 1024  # as SQS
MAX_PEEK = 100
ACK_MARGIN_S = 5  # past the handler's timeout: the trip there and back
ID_HEADER = "Osless-Msg-Id"
SENT_HEADER = "Osless-Sent-At"


def subject(app: str, queue: str) -> str:
    return f"osless.queue.{app}.{queue}"


def dlq_subject(app: str, name: str, kind: str) -> str:
    """A dead-letter queue's subject: a queue's (`kind` queue) or a function's async invocations'."""
    return f"osless.qdlq.{app}.{name}" if kind == "queue" else f"osless.dlq.{app}.{name}"


def consumer_name(app: str, queue: str) -> str:
    """`q_{app}_{queue}`: app names hold no `_`, so the first one after `q_` ends the app."""
    return f"q_{app}_{queue}"


def consumer_config(app: str, spec: ConsumerManifest) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(app, spec.queue),
        filter_subject=subject(app, spec.queue),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=float(spec.visibility_timeout_s + ACK_MARGIN_S),
        # Across every server: no more messages out at once than the consumer's batches in flight.
        max_ack_pending=spec.batch_size * spec.max_concurrency,
        max_deliver=-1,  # the tries are counted here (`retries`), and the last goes to the DLQ
    )


async def ensure_consumer(broker: Broker, config: ConsumerConfig) -> None:
    """Made, or updated to this config (a deploy changed it); one the engine will not update in
    place (its filter) is made again: its unacked messages come again after their ack wait."""
    assert broker.js is not None
    try:
        await broker.js.add_consumer(QUEUE_STREAM, config)
    except BadRequestError:
        assert config.durable_name is not None
        with contextlib.suppress(NotFoundError):
            await broker.js.delete_consumer(QUEUE_STREAM, config.durable_name)
        await broker.js.add_consumer(QUEUE_STREAM, config)


async def send(broker: Broker, app: str, queue: str, bodies: list[bytes]) -> list[str]:
    """Each message stored durably (acknowledged by the engine) before its id is returned."""
    assert broker.js is not None
    js = broker.js
    ids = [secrets.token_hex(12) for _ in bodies]
    sent = f"{time.time():.3f}"

    async def one(message_id: str, body: bytes) -> None:
        headers = {ID_HEADER: message_id, SENT_HEADER: sent}
        await js.publish(subject(app, queue), body, stream=QUEUE_STREAM, headers=headers)

    async with engine_errors():
        try:
            await asyncio.gather(*(one(i, b) for i, b in zip(ids, bodies, strict=True)))
        except APIError as e:  # a cap of the stream: the queue (or all of them) is full
            raise ApiError(
                429,
                "queue_full",
                f"queue {app}.{queue} takes no more messages now ({e.description}); retry once its "
                "consumer has caught up (`osless queue stats`)",
                headers={"retry-after": "5"},
            ) from e
    return ids


def _message(raw: Any) -> dict[str, Any]:
    headers = raw.headers or {}
    try:
        body = json.loads(raw.data or b"null")
    except ValueError:
        body = None
    sent = float(headers.get(SENT_HEADER, 0) or 0)
    return {"id": headers.get(ID_HEADER, ""), "seq": raw.seq, "sent_at": sent, "body": body}


async def _first(broker: Broker, stream: str, subj: str, after: int = 0) -> Any | None:
    assert broker.js is not None
    try:
        return await broker.js.get_msg(stream, seq=after + 1, subject=subj, next=True)
    except NotFoundError:
        return None


async def peek(broker: Broker, app: str, queue: str, limit: int) -> list[dict[str, Any]]:
    """The oldest messages waiting (or in flight), without taking them."""
    out: list[dict[str, Any]] = []
    async with engine_errors():
        seq = 0
        while len(out) < min(limit, MAX_PEEK):
            raw = await _first(broker, QUEUE_STREAM, subject(app, queue), seq)
            if raw is None:
                break
            out.append(_message(raw))
            seq = raw.seq
    return out


async def _count(broker: Broker, stream: str, subj: str) -> int:
    assert broker.js is not None
    info = await broker.js.stream_info(stream, subjects_filter=subj)
    return int(sum((info.state.subjects or {}).values()))


async def stats(broker: Broker, app: str, spec: ConsumerManifest) -> dict[str, Any]:
    """Depth (waiting and in flight), the oldest message's age, in flight, and the DLQ's depth."""
    assert broker.js is not None
    async with engine_errors():
        depth = await _count(broker, QUEUE_STREAM, subject(app, spec.queue))
        oldest = await _first(broker, QUEUE_STREAM, subject(app, spec.queue))
        in_flight, consumers = 0, 0
        with contextlib.suppress(NotFoundError):
            info = await broker.js.consumer_info(QUEUE_STREAM, consumer_name(app, spec.queue))
            in_flight, consumers = int(info.num_ack_pending or 0), 1
        dead = await _count(broker, DLQ_STREAM, dlq_subject(app, spec.queue, "queue"))
    age = max(0.0, time.time() - _message(oldest)["sent_at"]) if oldest is not None else 0.0
    return {
        "app": app,
        "queue": spec.queue,
        "depth": depth,
        "waiting": max(0, depth - in_flight),
        "in_flight": in_flight,
        "oldest_age_s": round(age, 3),
        "consumers": consumers,
        "dlq_depth": dead,
        **spec.model_dump(exclude={"queue"}),
    }


async def dead_letter_counts(broker: Broker, app: str) -> dict[tuple[str, str], int]:
    """The app's dead-letter queues that hold letters: (kind, name) -> how many."""
    assert broker.js is not None
    async with engine_errors():
        info = await broker.js.stream_info(DLQ_STREAM, subjects_filter=f"osless.*.{app}.*")
    out: dict[tuple[str, str], int] = {}
    for subj, n in (info.state.subjects or {}).items():
        kind_part, _, name = subj.split(".", 3)[1:]
        kind = {"qdlq": "queue", "dlq": "function"}.get(kind_part)
        if kind is not None:
            out[(kind, name)] = int(n)
    return out


async def dead_letters(broker: Broker, app: str, name: str, kind: str, limit: int) -> list[dict[str, Any]]:
    """The oldest letters of a dead-letter queue, each with its `seq` (what redrive and purge name)."""
    out: list[dict[str, Any]] = []
    async with engine_errors():
        seq = 0
        while len(out) < limit:
            raw = await _first(broker, DLQ_STREAM, dlq_subject(app, name, kind), seq)
            if raw is None:
                break
            try:
                letter = json.loads(raw.data or b"null")
            except ValueError:
                letter = {}
            out.append({"seq": raw.seq, **(letter if isinstance(letter, dict) else {})})
            seq = raw.seq
    return out


async def last_letter(broker: Broker) -> int:
    """The sequence of the newest letter of any dead-letter queue."""
    assert broker.js is not None
    async with engine_errors():
        return int((await broker.js.stream_info(DLQ_STREAM)).state.last_seq or 0)


async def take_letter(broker: Broker, seq: int) -> None:
    assert broker.js is not None
    with contextlib.suppress(NotFoundError):
        await broker.js.delete_msg(DLQ_STREAM, seq)


async def purge_dead(broker: Broker, app: str, name: str, kind: str) -> None:
    assert broker.js is not None
    async with engine_errors():
        await broker.js.purge_stream(DLQ_STREAM, subject=dlq_subject(app, name, kind))


async def forget_app(broker: Broker, app: str) -> None:
    """Everything of `app` in the engine: its consumers, queued messages, dead letters, queued async
    invocations and their states. A new app of the name must run none of them."""
    assert broker.js is not None
    js = broker.js
    async with engine_errors():
        for info in await js.consumers_info(QUEUE_STREAM):
            if info.name.startswith(f"q_{app}_"):
                with contextlib.suppress(NotFoundError):
                    await js.delete_consumer(QUEUE_STREAM, info.name)
        for stream, subj in (
            (QUEUE_STREAM, f"osless.queue.{app}.>"),
            (DLQ_STREAM, f"osless.qdlq.{app}.>"),
            (DLQ_STREAM, f"osless.dlq.{app}.>"),
            (INVOKE_STREAM, f"osless.invoke.{app}.>"),
            (f"KV_{STATE_BUCKET}", f"$KV.{STATE_BUCKET}.{app}.*"),
        ):
            await js.purge_stream(stream, subject=subj)


def check_body(body: Any) -> bytes:
    """A message's body as stored: its JSON in UTF-8, within the size limit."""
    try:
        data = encode(body)
    except RecursionError as e:  # nested past what the API's Python writes back
        raise ApiError(400, "bad_messages", "a message's body is nested too deeply") from e
    if len(data) > MAX_MESSAGE_BYTES:
        raise ApiError(
            413,
            "message_too_large",
            f"a message is at most {MAX_MESSAGE_BYTES // 1024} KiB (this one: {len(data)} bytes); "
            "send a reference to the data instead",
        )
    return data
