"""The state store: `Store` (the interface) and its backends. Imported by `api` and `server` only."""

from __future__ import annotations

import re
from pathlib import Path

from osless.store.base import (
    MAX_VALUE_BYTES,
    Compacted,
    Conflict,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    Store,
    StoreError,
    ValueTooLarge,
)
from osless.store.sqlite import SQLiteStore

__all__ = [
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
    "ValueTooLarge",
    "open_store",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SUPPORTED = "supported: 'sqlite:///ABSOLUTE/PATH.db' or a plain file path (etcd is not implemented yet)"


def open_store(url: str) -> Store:
    """The store for `url` (`sqlite:///abs/path.db` or a plain path), not started yet."""
    if not url:
        raise ValueError(f"empty store URL; {_SUPPORTED}")
    match = _SCHEME.match(url)
    if match is None:
        return SQLiteStore(Path(url))
    scheme = match.group(1).lower()
    if scheme != "sqlite":
        raise ValueError(f"unsupported store URL scheme {scheme!r} in {url!r}; {_SUPPORTED}")
    path = url[match.end() :]  # sqlite:///abs/x.db -> /abs/x.db
    if not path.startswith("/"):
        raise ValueError(f"store URL {url!r} must hold an absolute path; {_SUPPORTED}")
    return SQLiteStore(Path(path))
