"""etcd backend of the store: etcd's v3 API over gRPC, so that several API servers share one state.

It drives etcd through the generated v3 stubs that `aetcd` ships (`aetcd.rpc`) rather than through
`aetcd.Client`, which connects to a single host:port and hands back neither the revision of a put
or transaction nor a watch's progress, both of which the Store contract needs. One gRPC channel
spans every endpoint of the URL, its calls spread over the members (round robin, as etcd's own
client does): when a member goes away, calls wait (up to `timeout`) for another, reads are retried,
and a watch resumes after the last revision it delivered. Every call carries etcd's `hasleader`
flag, so a member cut off from its leader refuses at once (and a watch on it ends) instead of
answering from a stale view; sent again, the call goes to another member.

Keys live under a root (`/osless` unless the URL names one): platforms sharing one etcd, and tests,
never see each other's keys. Roots must not nest (`/a` and `/a/b`).

How etcd's own features make up the contract:
- the revision is etcd's (1 on an empty etcd, and other platforms' writes bump it too);
- `if_revision` checks are compares in one Txn (mod_revision == N, or create_revision == 0 for
  "absent") whose failure branch reads the keys, so `Conflict` tells the revision they really had;
- a write is acknowledged once a quorum of members has it in its fsynced log;
- history: etcd keeps every revision until it is compacted. The store compacts to `history`
  revisions behind the head every `compact_interval` seconds (as Kubernetes' API server does), the
  window the SQLite backend keeps; a watch from before it raises `Compacted`;
- leases: etcd counts whole seconds (at least its minimum TTL) and expires leases every 0.5 s, so
  a lease lives a little longer than asked, never shorter.
A write whose connection broke after it was sent is not retried: it raises `Unavailable`, since it
may have been applied (a retried compare-and-swap would then conflict with itself).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

# Before gRPC loads: its fork handlers off. This process starts children (nats-server, the builder)
# by fork and exec while gRPC's threads run; with the handlers on, a child could abort in gRPC's code
# between the two (seen: nats-server "exited" with SIGABRT at start). No child here uses gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]
from aetcd.utils import prefix_range_end  # type: ignore[import-untyped]

from osless.bounds import cap, quoted
from osless.store.base import (
    DEFAULT_HISTORY,
    Compacted,
    Conflict,
    Event,
    KeyValue,
    LeaseNotFound,
    Store,
    StoreError,
    Unavailable,
)
from osless.store.checks import check_if_revision, check_key, check_prefix, check_txn, check_value

__all__ = ["DEFAULT_ROOT", "EtcdStore", "EtcdTLS", "parse_endpoint"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ROOT = "/osless"
DEFAULT_PORT = 2379
PAGE = 1000  # keys per Range call in `list`, so no single answer holds the whole store
_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # between retries of a read, or reconnects of a watch
_LEADER = (("hasleader", "true"),)
_OPTIONS = [
    # Spread calls over the members, as etcd's own client does: a call refused by a member that
    # lost its leader (or a watch it ended) goes to another one when sent again.
    ("grpc.lb_policy_name", "round_robin"),
    # A page of large values or a watch's catch-up batch can pass gRPC's 4 MiB default; etcd is ours.
    ("grpc.max_receive_message_length", -1),
    # Notice a member that froze or was cut off, not only one that closed its connections.
    # etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class _RangeCompacted(StoreError):
    """A read at a pinned revision found it compacted (a list restarts from the head)."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port`, `host` (port 2379) or `[v6]:port` as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or host.endswith(":") or (text.startswith("[") and not host.endswith("]")):
        host, port = text, str(DEFAULT_PORT)  # no port, or a bare IPv6 address in brackets
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad etcd endpoint {quoted(text)}: expected HOST:PORT, such as 127.0.0.1:2379")
    return host, int(port)


@dataclass(frozen=True)
class EtcdTLS:
    """TLS to etcd: the CA that signed the members' certificates and, for etcd's
    `--client-cert-auth` (the way etcd knows its clients), this client's certificate and key.

    `server_name`: the name checked in the members' certificates (default: the first endpoint's
    host as written in the URL), since the gRPC target names addresses, not the names certified."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls, ca: Path, cert: Path | None = None, key: Path | None = None, server_name: str | None = None
    ) -> EtcdTLS:
        if (cert is None) != (key is None):
            raise ValueError("an etcd client certificate needs its key, and a key its certificate")

        def read(what: str, path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the etcd {what} {quoted(str(path))}: {e.strerror}") from e
            if b"-----BEGIN" not in data:
                raise ValueError(f"the etcd {what} {quoted(str(path))} is not PEM")
            return data

        return cls(read("CA file", ca) or b"", read("certificate", cert), read("key", key), server_name)


class EtcdStore(Store):
    """The store in an etcd cluster, under `root`. Call `start()` (or use `async with`) first.

    `endpoints`: `host:port` of each member (a client URL's address); any one of them suffices.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        root: str = DEFAULT_ROOT,
        history: int = DEFAULT_HISTORY,
        compact_interval: float = 60.0,
        timeout: float = 10.0,
        tls: EtcdTLS | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("an etcd store needs at least one endpoint (HOST:PORT)")
        if not root.startswith("/") or root.endswith("/") or "//" in root:
            raise ValueError(f"an etcd root must look like /name or /a/b, not {quoted(root)}")
        if history < 1:
            raise ValueError("history must keep at least one revision")
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.root = root
        self._root = root.encode()
        self._history = history
        self._compact_interval = compact_interval
        self._timeout = timeout
        self._tls = tls
        self._channel: Any = None
        self._kv: Any = None
        self._leases: Any = None
        self._watch: Any = None
        self._compactor: asyncio.Task[None] | None = None
        self._compacted = 0  # the highest revision this store compacted etcd to
        self._closed = False
        self._watchers = 0  # live watch generators; lets tests see that a stopped watch cleaned up

    @property
    def where(self) -> str:
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._closed:
            raise StoreError("store is closed; open a new one")
        if self._channel is not None:
            return
        self._channel = self._open_channel(await self._target())
        self._kv = rpc.KVStub(self._channel)
        self._leases = rpc.LeaseStub(self._channel)
        self._watch = rpc.WatchStub(self._channel)
        try:
            await self.revision()  # fail here, naming the endpoints, rather than at first use
        except BaseException:
            await self._channel.close()
            self._channel = None
            raise
        self._compactor = asyncio.create_task(self._compact_forever(), name="osless-etcd-compactor")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._compactor is not None:
            self._compactor.cancel()
            await asyncio.wait([self._compactor])
            self._compactor = None
        if self._channel is not None:
            await self._channel.close()  # ends every call under way: watchers see `_closed`

    async def __aenter__(self) -> EtcdStore:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _open_channel(self, target: str) -> Any:
        if self._tls is None:
            return grpc.aio.insecure_channel(target, options=_OPTIONS)
        tls = self._tls
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert
        )
        name = tls.server_name or self.endpoints[0][0]
        return grpc.aio.secure_channel(
            target, credentials, options=[*_OPTIONS, ("grpc.ssl_target_name_override", name)]
        )

    async def _target(self) -> str:
        """A gRPC target naming every member's address (names resolved once, here)."""
        loop = asyncio.get_running_loop()
        v4: dict[str, None] = {}
        v6: dict[str, None] = {}
        for host, port in self.endpoints:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise StoreError(f"cannot resolve the etcd endpoint {quoted(host)}: {e}") from e
            for family, _, _, _, addr in infos:
                ip = str(addr[0])
                if family == socket.AF_INET:
                    v4[f"{ip}:{port}"] = None
                elif family == socket.AF_INET6:
                    v6[f"[{ip}]:{port}"] = None
        # gRPC's static targets take one family; IPv4 where a name has both (etcd listens on it).
        return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")
        if self._channel is None:
            raise StoreError("store is not started: call start() first")

    async def _call(
        self, send: Callable[[float], Awaitable[T]], *, retry: bool, lease: int | None = None
    ) -> T:
        """One request to etcd, given the time it has left; retried while etcd is unreachable if
        `retry` (reads, and writes that cannot have been applied twice to any effect)."""
        self._check_open()
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                return await send(max(deadline - time.monotonic(), 0.001))
            except grpc.aio.AioRpcError as e:
                if self._closed:
                    raise StoreError("store is closed") from e
                code, details = e.code(), e.details() or ""
                # A member without a leader refuses before doing anything: safe to send again
                # (round robin sends it to another member).
                again = code == grpc.StatusCode.UNAVAILABLE and (retry or "no leader" in details)
                pause = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                if not again or time.monotonic() + pause >= deadline:
                    raise self._error(e, lease) from e
                attempt += 1
                await asyncio.sleep(pause)
            except asyncio.CancelledError:
                self._raise_if_closed()
                raise
            except grpc.aio.UsageError as e:  # the channel was closed under this call
                raise StoreError("store is closed") from e

    def _raise_if_closed(self) -> None:
        """gRPC cancels a call when its channel closes: that is the store closing, not our task."""
        task = asyncio.current_task()
        if self._closed and (task is None or not task.cancelling()):
            raise StoreError("store is closed") from None

    def _error(self, e: Any, lease: int | None) -> StoreError:
        code, details = e.code(), cap(e.details() or "", 1000)
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details and lease is not None:
            return LeaseNotFound(lease)
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
            return _RangeCompacted(details)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(
                f"etcd at {self.where} did not answer within {self._timeout:g} s ({details}); "
                "a write under way may or may not have been applied"
            )
        if "too many operations in txn request" in details:
            return StoreError(
                "the transaction has more operations than etcd takes: start etcd with a higher "
                "--max-txn-ops (128 by default)"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "request is too large" in details:
            return StoreError(
                f"the request is larger than etcd takes ({details}): start etcd with a higher "
                "--max-request-bytes (1.5 MiB by default)"
            )
        return StoreError(f"etcd answered {code.name}: {details}")

    # -- keys -------------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return self._root + key.encode()

    def _range(self, prefix: str) -> tuple[bytes, bytes]:
        start = self._root + (prefix or "/").encode()  # every key starts with '/'
        return start, bytes(prefix_range_end(start))

    def _kv_of(self, kv: Any) -> KeyValue:
        return KeyValue(
            key=kv.key[len(self._root) :].decode("utf-8", "surrogateescape"),
            value=bytes(kv.value),
            create_revision=int(kv.create_revision),
            mod_revision=int(kv.mod_revision),
            version=int(kv.version),
            lease=int(kv.lease) or None,
        )

    @staticmethod
    def _compare(key: bytes, if_revision: int) -> Any:
        if if_revision == 0:
            return rpc.Compare(
                key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=0
            )
        return rpc.Compare(
            key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.MOD, mod_revision=if_revision
        )

    async def _range_call(self, request: Any) -> Any:
        return await self._call(
            lambda t: self._kv.Range(request, timeout=t, wait_for_ready=True, metadata=_LEADER), retry=True
        )

    async def _txn(
        self,
        compare: builtins.list[Any],
        success: builtins.list[Any],
        failure: builtins.list[Any],
        *,
        lease: int | None = None,
    ) -> Any:
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self._call(
            lambda t: self._kv.Txn(request, timeout=t, wait_for_ready=True, metadata=_LEADER),
            retry=False,
            lease=lease,
        )

    # -- async API --------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        check_key(key)
        resp = await self._range_call(rpc.RangeRequest(key=self._key(key)))
        return self._kv_of(resp.kvs[0]) if resp.kvs else None

    async def list(self, prefix: str) -> tuple[builtins.list[KeyValue], int]:
        check_prefix(prefix)
        start, end = self._range(prefix)
        for _ in range(10):
            items: builtins.list[KeyValue] = []
            key, rev = start, 0
            try:
                while True:
                    # Every page at the first page's revision: one consistent snapshot.
                    resp = await self._range_call(
                        rpc.RangeRequest(key=key, range_end=end, limit=PAGE, revision=rev)
                    )
                    rev = rev or int(resp.header.revision)
                    items.extend(self._kv_of(kv) for kv in resp.kvs)
                    if not resp.more:
                        return items, rev
                    key = bytes(resp.kvs[-1].key) + b"\x00"
            except _RangeCompacted:
                continue  # compacted past our snapshot while paging: read again from the head
        raise StoreError(f"could not list {quoted(prefix)}: etcd kept compacting past the read")

    async def put(
        self, key: str, value: bytes, *, if_revision: int | None = None, lease: int | None = None
    ) -> KeyValue:
        check_key(key)
        check_if_revision(if_revision)
        data = bytes(value)
        check_value(key, data)
        k = self._key(key)
        # The Range after the Put, in the same Txn, reads what the put made (create revision and
        # version) without sending the value back.
        success = [
            rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=data, lease=lease or 0)),
            rpc.RequestOp(request_range=rpc.RangeRequest(key=k, keys_only=True)),
        ]
        if if_revision is None:
            resp = await self._txn([], success, [], lease=lease)
        else:
            failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k, keys_only=True))]
            resp = await self._txn([self._compare(k, if_revision)], success, failure, lease=lease)
            if not resp.succeeded:
                found = resp.responses[0].response_range.kvs
                raise Conflict(key, if_revision, int(found[0].mod_revision) if found else 0)
        made = self._kv_of(resp.responses[1].response_range.kvs[0])
        return KeyValue(key, data, made.create_revision, made.mod_revision, made.version, made.lease)

    async def delete(self, key: str, *, if_revision: int | None = None) -> bool:
        check_key(key)
        check_if_revision(if_revision)
        k = self._key(key)
        gone = [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k))]
        if if_revision is None:
            resp = await self._txn([], gone, [])
        else:
            failure = [rpc.RequestOp(request_range=rpc.RangeRequest(key=k, keys_only=True))]
            resp = await self._txn([self._compare(k, if_revision)], gone, failure)
            if not resp.succeeded:
                found = resp.responses[0].response_range.kvs
                if not found:
                    return False  # absent, whatever the check
                raise Conflict(key, if_revision, int(found[0].mod_revision))
        return int(resp.responses[0].response_delete_range.deleted) > 0

    async def txn_put_many(self, puts: builtins.list[tuple[str, bytes, int | None]]) -> int:
        return await self.txn(puts=puts)

    async def txn(
        self,
        *,
        puts: builtins.list[tuple[str, bytes, int | None]] | None = None,
        deletes: builtins.list[tuple[str, int | None]] | None = None,
        delete_prefixes: builtins.list[str] | None = None,
        checks: builtins.list[tuple[str, int]] | None = None,
    ) -> int:
        items, gone, prefixes, unchanged = check_txn(puts, deletes, delete_prefixes, checks)
        # Checked in the order the SQLite backend checks them, so both name the same Conflict.
        checked = [(key, rev) for key, _, rev in items if rev is not None]
        checked += [(key, rev) for key, rev in gone if rev is not None]
        checked += unchanged
        success = []  # prefixes, then keys, then puts: the order of the events, as in SQLite
        for prefix in prefixes:
            start, end = self._range(prefix)
            success.append(
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=start, range_end=end))
            )
        for key, _ in gone:
            success.append(rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._key(key))))
        for key, value, _ in items:
            success.append(rpc.RequestOp(request_put=rpc.PutRequest(key=self._key(key), value=value)))
        compare = [self._compare(self._key(key), rev) for key, rev in checked]
        failure = [
            rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(key), keys_only=True))
            for key, _ in checked
        ]
        resp = await self._txn(compare, success, failure)
        if resp.succeeded:
            return int(resp.header.revision)
        for (key, expected), answer in zip(checked, resp.responses, strict=True):
            found = answer.response_range.kvs
            actual = int(found[0].mod_revision) if found else 0
            if actual != expected:
                raise Conflict(key, expected, actual)
        raise StoreError("etcd refused the transaction's checks, yet every key read as expected")

    async def watch(self, prefix: str, *, after_revision: int) -> AsyncGenerator[Event, None]:
        check_prefix(prefix)
        if after_revision < 0:
            raise ValueError(f"after_revision must be >= 0, not {after_revision}")
        self._check_open()
        start, end = self._range(prefix)
        cursor = after_revision
        failures = 0
        self._watchers += 1
        try:
            while True:
                self._check_open()
                call = self._watch.Watch(metadata=_LEADER, wait_for_ready=True)
                try:
                    # From `cursor` itself, not cursor + 1: etcd refuses a start before its compaction
                    # revision C, and the events at C may be incomplete, so from C on we skip them.
                    # 0 would mean "from now" to etcd: the whole history starts at 1.
                    create = rpc.WatchCreateRequest(key=start, range_end=end, start_revision=max(cursor, 1))
                    await call.write(rpc.WatchRequest(create_request=create))
                    while True:
                        resp = await call.read()
                        if resp is grpc.aio.EOF:
                            raise StoreError("etcd ended the watch stream")
                        if resp.compact_revision:
                            raise Compacted(cursor, int(resp.compact_revision))
                        if resp.canceled:
                            raise StoreError(f"etcd cancelled the watch: {cap(resp.cancel_reason, 1000)}")
                        if failures:
                            log.warning("etcd watch of %s resumed after revision %d", quoted(prefix), cursor)
                            failures = 0
                        # Without `fragment`, one answer holds whole revisions: the cursor can move to
                        # its last one before the events are handed out.
                        events = [self._event(e) for e in resp.events if e.kv.mod_revision > cursor]
                        if resp.events:
                            cursor = max(cursor, int(resp.events[-1].kv.mod_revision))
                        for event in events:
                            yield event
                except Compacted:
                    raise
                except (grpc.aio.AioRpcError, StoreError) as e:
                    if self._closed:
                        raise StoreError("store is closed") from e
                    failures += 1
                    if failures == 1:
                        why = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else e
                        log.warning(
                            "etcd watch of %s broke (%s); resuming after revision %d",
                            quoted(prefix),
                            cap(str(why), 1000),
                            cursor,
                        )
                except asyncio.CancelledError:
                    self._raise_if_closed()
                    raise
                finally:
                    call.cancel()
                await asyncio.sleep(_BACKOFF_S[min(failures - 1, len(_BACKOFF_S) - 1)])
        finally:
            self._watchers -= 1

    def _event(self, e: Any) -> Event:
        kv = self._kv_of(e.kv)
        if e.type == rpc.Event.DELETE:
            return Event("DELETE", kv.key, None, kv.mod_revision)
        return Event("PUT", kv.key, kv, kv.mod_revision)

    async def revision(self) -> int:
        resp = await self._range_call(rpc.RangeRequest(key=self._root, count_only=True))
        return int(resp.header.revision)

    async def grant_lease(self, ttl_s: float) -> int:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl must be positive, not {ttl_s}")
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl_s)))
        # Safe to send again: a lease granted twice leaves one unused, which expires by itself.
        resp = await self._call(
            lambda t: self._leases.LeaseGrant(request, timeout=t, wait_for_ready=True, metadata=_LEADER),
            retry=True,
        )
        if resp.error:
            raise StoreError(f"etcd refused a lease: {cap(resp.error, 1000)}")
        return int(resp.ID)

    async def keepalive(self, lease_id: int) -> None:
        async def once(timeout: float) -> int:
            call = self._leases.LeaseKeepAlive(timeout=timeout, wait_for_ready=True, metadata=_LEADER)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                resp = await call.read()
            finally:
                call.cancel()
            return 0 if resp is grpc.aio.EOF else int(resp.TTL)

        if await self._call(once, retry=True) <= 0:  # etcd answers TTL 0 for an unknown or expired lease
            raise LeaseNotFound(lease_id)

    async def revoke(self, lease_id: int) -> None:
        request = rpc.LeaseRevokeRequest(ID=lease_id)
        await self._call(
            lambda t: self._leases.LeaseRevoke(request, timeout=t, wait_for_ready=True, metadata=_LEADER),
            retry=False,
            lease=lease_id,
        )

    # -- history ----------------------------------------------------------------------------------

    async def compact(self) -> None:
        """Drop etcd's history older than `history` revisions behind the head, now."""
        target = await self.revision() - self._history
        if target <= self._compacted:
            return
        request = rpc.CompactionRequest(revision=target)
        with contextlib.suppress(_RangeCompacted):  # another server sharing this etcd went further
            await self._call(
                lambda t: self._kv.Compact(request, timeout=t, wait_for_ready=True, metadata=_LEADER),
                retry=True,
            )
        self._compacted = target

    async def _compact_forever(self) -> None:
        while True:
            await asyncio.sleep(self._compact_interval)
            try:
                await self.compact()
            except StoreError as e:
                if self._closed:
                    return
                log.warning("etcd compaction failed, trying again in %g s: %s", self._compact_interval, e)
            except Exception:
                # Keep compacting: without it etcd's history grows until its space quota stops writes.
                log.exception("etcd compaction failed")
