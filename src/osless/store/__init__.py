"""The state store: `Store` (the interface) and its backends. Imported by `api` and `server` only.

`SQLiteStore` is here; `osless.store.etcd.EtcdStore` is imported only when an etcd URL is opened,
as it needs gRPC (the `etcd` extra), which a single machine never loads.
"""

from __future__ import annotations

import re
from pathlib import Path

from osless.bounds import quoted
from osless.store.base import (
    DEFAULT_HISTORY,
    MAX_VALUE_BYTES,
    Compacted,
    Conflict,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    Store,
    StoreError,
    Unavailable,
    ValueTooLarge,
)
from osless.store.sqlite import SQLiteStore

__all__ = [
    "DEFAULT_HISTORY",
    "MAX_VALUE_BYTES",
    "Compacted",
    "Conflict",
    "Event",
    "EventType",
    "KeyValue",
    "LeaseNotFound",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Unavailable",
    "ValueTooLarge",
    "open_store",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SUPPORTED = (
    "supported: 'sqlite:///ABSOLUTE/PATH.db', a plain file path, "
    "or 'etcd://HOST:PORT[,HOST:PORT...][/ROOT]' (ROOT defaults to /osless)"
)


def open_store(url: str) -> Store:
    """The store for `url`, not started yet: `sqlite:///abs/path.db`, a plain path, or
    `etcd://host:2379[,host2:2379]/root` (every member's client address; keys under /root)."""
    if not url:
        raise ValueError(f"empty store URL; {_SUPPORTED}")
    match = _SCHEME.match(url)
    if match is None:
        return SQLiteStore(Path(url))
    scheme = match.group(1).lower()
    rest = url[match.end() :]
    if scheme == "etcd":
        return _open_etcd(url, rest)
    if scheme != "sqlite":
        raise ValueError(f"unsupported store URL scheme {scheme!r} in {quoted(url)}; {_SUPPORTED}")
    if not rest.startswith("/"):  # sqlite:///abs/x.db -> /abs/x.db
        raise ValueError(f"store URL {quoted(url)} must hold an absolute path; {_SUPPORTED}")
    return SQLiteStore(Path(rest))


def _open_etcd(url: str, rest: str) -> Store:
    if "?" in rest or "#" in rest:
        raise ValueError(f"an etcd store URL takes no query or fragment: {quoted(url)}; {_SUPPORTED}")
    hosts, _, path = rest.partition("/")
    if not hosts:
        raise ValueError(f"an etcd store URL needs at least one HOST:PORT: {quoted(url)}; {_SUPPORTED}")
    try:
        from osless.store.etcd import DEFAULT_ROOT, EtcdStore
    except ImportError as e:
        raise ValueError(f"the etcd store needs the etcd extra ({e}): pip install 'osless[etcd]'") from e
    root = "/" + path.rstrip("/") if path.rstrip("/") else DEFAULT_ROOT
    return EtcdStore(hosts.split(","), root=root)
