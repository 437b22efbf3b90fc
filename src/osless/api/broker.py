"""The API's connection to the message engine (NATS JetStream), and what the platform keeps in it.

Only the API's process talks to NATS: nodes and apps never do (apps send through the API, with their
identity, when queues come). Streams, each with file storage:
- `INVOCATIONS` (`osless.invoke.{app}.{function}`): accepted async invocations, a work queue (a message
  goes once it is acked); its duplicate window (`DEDUPE_WINDOW_S`, 24 h) is what makes an idempotency
  key (the message's `Nats-Msg-Id`) accepted once.
- `DLQ` (`osless.dlq.{app}.{function}`, and a queue's `osless.qdlq.{app}.{queue}`): what ran out of
  tries, with its error, kept 14 days.
Each stream has caps (bytes, a message's size, messages per subject: one app or queue cannot fill the
disk for all) and refuses new messages when full (`discard` new): nothing acknowledged is dropped.
- `QUEUES` (`osless.queue.{app}.{queue}`): the apps' queues, one work queue for all (api/queues.py).
- the key-value bucket `invocations`: each invocation's state, kept 24 h (`STATE_TTL_S`).
The setup is idempotent: every server of a cluster makes (or finds) the same ones at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

__all__ = [
    "DEDUPE_WINDOW_S",
    "DLQ_STREAM",
    "INVOKE_STREAM",
    "QUEUE_STREAM",
    "STATE_BUCKET",
    "STATE_TTL_S",
    "Broker",
]

log = logging.getLogger("osless")

INVOKE_STREAM = "INVOCATIONS"
DLQ_STREAM = "DLQ"
QUEUE_STREAM = "QUEUES"
STATE_BUCKET = "invocations"
DEDUPE_WINDOW_S = 24 * 3600.0
STATE_TTL_S = 24 * 3600.0
DLQ_AGE_S = 14 * 24 * 3600.0
CONNECT_S = 30.0
CLOSE_S = 2.0  # what a stop waits for the connection to close
# Caps: a stream's whole size, one message's (the 256 KiB of an event or a message, and its
# envelope), and what one subject (a function's invocations, a queue) may hold at once.
STREAM_MAX_BYTES = 8 * 1024**3
MAX_MSG_BYTES = 1024 * 1024
PER_SUBJECT = {"INVOCATIONS": 100_000, "QUEUES": 1_000_000, "DLQ": 100_000}


def _caps(stream: str) -> dict[str, Any]:
    return {
        "max_bytes": STREAM_MAX_BYTES,
        "max_msg_size": MAX_MSG_BYTES,
        "max_msgs_per_subject": PER_SUBJECT[stream],
        "discard": DiscardPolicy.NEW,
        "discard_new_per_subject": True,
    }


class Broker:
    """One connection (reconnecting for ever), its JetStream context, and the platform's streams."""

    def __init__(self, url: str, replicas: int = 1) -> None:
        self.url = url  # may carry a token: never logged
        self.replicas = replicas  # of each stream and of the bucket: 3 on a 3-node JetStream cluster
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.states: KeyValue | None = None

    async def connect(self) -> None:
        deadline = asyncio.get_running_loop().time() + CONNECT_S
        while True:
            try:
                self.nc = await nats.connect(
                    self.url,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    error_cb=self._error,
                )
                break
            except Exception as e:
                if asyncio.get_running_loop().time() > deadline:
                    raise SystemExit(f"cannot connect to the message engine (NATS): {e}") from None
                await asyncio.sleep(0.5)
        self.js = self.nc.jetstream()
        await self._ensure()

    async def _error(self, e: Exception) -> None:
        log.warning("message engine: %s", e)

    async def _ensure(self) -> None:
        js = self.js
        assert js is not None
        streams = [
            StreamConfig(
                name=INVOKE_STREAM,
                subjects=["osless.invoke.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=DEDUPE_WINDOW_S,
                num_replicas=self.replicas,
                **_caps(INVOKE_STREAM),
            ),
            StreamConfig(
                name=DLQ_STREAM,
                subjects=["osless.dlq.>", "osless.qdlq.>"],
                storage=StorageType.FILE,
                max_age=DLQ_AGE_S,
                duplicate_window=120.0,
                num_replicas=self.replicas,
                **_caps(DLQ_STREAM),
            ),
            StreamConfig(
                name=QUEUE_STREAM,
                subjects=["osless.queue.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                **_caps(QUEUE_STREAM),
            ),
        ]
        for config in streams:
            try:
                await js.add_stream(config)
            except BadRequestError:  # made already (by an earlier start, or another server): as it is
                await js.update_stream(config)
        bucket = KeyValueConfig(
            bucket=STATE_BUCKET,
            history=1,
            ttl=STATE_TTL_S,
            storage=StorageType.FILE,
            replicas=self.replicas,
        )
        try:
            self.states = await js.create_key_value(bucket)
        except BadRequestError:  # there with other settings (replicas): used as it is
            self.states = await js.key_value(STATE_BUCKET)

    async def close(self) -> None:
        """Closed, not drained: a drain waits (up to 30 s) on the dispatcher's pull subscription,
        holding the server's stop; what was not acked is delivered again anyway."""
        if self.nc is not None:
            with contextlib.suppress(asyncio.TimeoutError, nats.errors.Error):
                await asyncio.wait_for(self.nc.close(), CLOSE_S)
