"""The API's connection to the message engine (NATS JetStream), and what the platform keeps in it.

Only the API's process talks to NATS: nodes and apps never do (apps send through the API, with their
identity, when queues come). Streams, each with file storage:
- `INVOCATIONS` (`osless.invoke.{app}.{function}`): accepted async invocations, a work queue (a message
  goes once it is acked); its duplicate window (`DEDUPE_WINDOW_S`, 24 h) is what makes an idempotency
  key (the message's `Nats-Msg-Id`) accepted once.
- `DLQ` (`osless.dlq.{app}.{function}`): what ran out of tries, with its error, kept 14 days.
- the key-value bucket `invocations`: each invocation's state, kept 24 h (`STATE_TTL_S`).
The setup is idempotent: every server of a cluster makes (or finds) the same ones at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

__all__ = ["DEDUPE_WINDOW_S", "DLQ_STREAM", "INVOKE_STREAM", "STATE_TTL_S", "Broker"]

log = logging.getLogger("osless")

INVOKE_STREAM = "INVOCATIONS"
DLQ_STREAM = "DLQ"
STATE_BUCKET = "invocations"
DEDUPE_WINDOW_S = 24 * 3600.0
STATE_TTL_S = 24 * 3600.0
DLQ_AGE_S = 14 * 24 * 3600.0
CONNECT_S = 30.0
CLOSE_S = 2.0  # what a stop waits for the connection to close


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
            ),
            StreamConfig(
                name=DLQ_STREAM,
                subjects=["osless.dlq.>"],
                storage=StorageType.FILE,
                max_age=DLQ_AGE_S,
                duplicate_window=120.0,
                num_replicas=self.replicas,
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
