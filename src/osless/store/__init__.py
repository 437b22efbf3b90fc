"""The state store: `Store` (the interface) and its backends. Imported by `api` and `server` only.

`SQLiteStore` is here; `osless.store.etcd.EtcdStore` is imported only when an etcd URL is opened,
as it needs gRPC (the `etcd` extra), which a single machine never loads.
"""

from __future__ import annotations

import re
import urllib.parse
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
    "'etcd://HOST:PORT[,HOST:PORT...][/ROOT]' (ROOT defaults to /osless), "
    "or 'etcds://HOST:PORT[,...][/ROOT]?ca=CA.pem[&cert=CLIENT.pem&key=CLIENT-KEY.pem][&name=SERVER]' (TLS)"
)
_TLS_PARAMS = ("ca", "cert", "key", "name")


def open_store(url: str) -> Store:
    """The store for `url`, not started yet: `sqlite:///abs/path.db`, a plain path, or
    `etcd://host:2379[,host2:2379]/root` (every member's client address; keys under /root), or
    `etcds://...?ca=PATH&cert=PATH&key=PATH` for etcd over TLS (a client certificate for etcd's
    `--client-cert-auth`; `name=` the name its members' certificates carry, if not the host)."""
    if not url:
        raise ValueError(f"empty store URL; {_SUPPORTED}")
    match = _SCHEME.match(url)
    if match is None:
        return SQLiteStore(Path(url))
    scheme = match.group(1).lower()
    rest = url[match.end() :]
    if scheme in ("etcd", "etcds"):
        return _open_etcd(url, rest, tls=scheme == "etcds")
    if scheme != "sqlite":
        raise ValueError(f"unsupported store URL scheme {scheme!r} in {quoted(url)}; {_SUPPORTED}")
    if not rest.startswith("/"):  # sqlite:///abs/x.db -> /abs/x.db
        raise ValueError(f"store URL {quoted(url)} must hold an absolute path; {_SUPPORTED}")
    return SQLiteStore(Path(rest))


def _open_etcd(url: str, rest: str, *, tls: bool) -> Store:
    rest, _, query = rest.partition("?")
    if "#" in rest or "#" in query:
        raise ValueError(f"an etcd store URL takes no fragment: {quoted(url)}; {_SUPPORTED}")
    if query and not tls:
        raise ValueError(f"an etcd:// URL takes no query (TLS is etcds://): {quoted(url)}; {_SUPPORTED}")
    hosts, _, path = rest.partition("/")
    if not hosts:
        raise ValueError(f"an etcd store URL needs at least one HOST:PORT: {quoted(url)}; {_SUPPORTED}")
    try:
        from osless.store.etcd import DEFAULT_ROOT, EtcdStore, EtcdTLS
    except ImportError as e:
        raise ValueError(f"the etcd store needs the etcd extra ({e}): pip install 'osless[etcd]'") from e
    root = "/" + path.rstrip("/") if path.rstrip("/") else DEFAULT_ROOT
    if not tls:
        return EtcdStore(hosts.split(","), root=root)
    params: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in _TLS_PARAMS or key in params or not value:
            raise ValueError(
                f"bad TLS parameter {quoted(key)} in {quoted(url)}: give each of "
                f"{', '.join(_TLS_PARAMS)} at most once, with a value; {_SUPPORTED}"
            )
        params[key] = value
    if "ca" not in params:
        raise ValueError(f"an etcds:// URL needs ca=PATH (the members' CA): {quoted(url)}; {_SUPPORTED}")
    certs = EtcdTLS.from_files(
        Path(params["ca"]),
        Path(params["cert"]) if "cert" in params else None,
        Path(params["key"]) if "key" in params else None,
        server_name=params.get("name"),
    )
    return EtcdStore(hosts.split(","), root=root, tls=certs)
