"""The build's way out: resolving and installing reach the package index, and nothing else.

Each sandboxed resolve or install gets a unix socket of its own on an `EgressProxy` (the node's
proxy: the same operator's rules, so internal addresses stay refused whatever is listed), whose
allowlist is the index's hosts: pypi.org and files.pythonhosted.org, plus the hosts of the indexes
the operator set in uv's environment (`UV_INDEX_URL`, `UV_EXTRA_INDEX_URL`, `UV_DEFAULT_INDEX`,
`UV_INDEX`) on the platform's process. The sandbox's forwarder relays 127.0.0.1:3128 to it, and
uv finds it through `HTTPS_PROXY`.

The proxy runs on an event loop of its own, on a thread of its own, rather than on the API's loop:
a build moves hundreds of megabytes of wheels, and `osless up` runs the API and the gateway on one
loop, whose every request would wait behind those relays. The builder is synchronous (a worker
thread) and stays usable without a running loop, in tests and benchmarks alike.

Imported by `osless.server` (and tests) only: not from `osless.builder`, whose `source` the CLI uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from osless.builder.process import Log
from osless.node.egress import EgressProxy
from osless.node.egress_rules import Network

__all__ = ["DEFAULT_INDEX_HOSTS", "INDEX_ENV", "BuildEgress", "index_hosts"]

DEFAULT_INDEX_HOSTS = ("pypi.org", "files.pythonhosted.org")
INDEX_ENV = ("UV_INDEX_URL", "UV_EXTRA_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX")
_CALL_TIMEOUT_S = 30.0
T = TypeVar("T")


def index_hosts(env: Mapping[str, str]) -> list[str]:
    """The hosts builds may reach: PyPI's, plus those of the indexes configured in uv's environment."""
    hosts = list(DEFAULT_INDEX_HOSTS)
    for var in INDEX_ENV:
        for item in env.get(var, "").split():
            # UV_INDEX entries may be named: `name=https://...`.
            name, sep, rest = item.partition("=")
            url = rest if sep and "://" not in name else item
            host = urlsplit(url).hostname
            if host and host not in hosts:
                hosts.append(host)
    return hosts


class BuildEgress:
    """Per-step egress sockets in `socket_dir` (which only root may enter), to `hosts` only."""

    def __init__(self, socket_dir: Path, *, hosts: Iterable[str], allow: Iterable[Network] = ()) -> None:
        self.socket_dir = Path(socket_dir)
        self.socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.hosts = list(hosts)
        self._logs: dict[str, Log] = {}
        self._loop = asyncio.new_event_loop()
        # No gateway: a build reaches no osless app.
        self.proxy = EgressProxy(gateway=None, log=self._log, allow=allow)
        self._thread = threading.Thread(target=self._loop.run_forever, name="build egress", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def socket(self, uid: int, log: Log) -> Iterator[Path]:
        """A socket that `uid` alone may connect to, for one step; its refusals go to `log`."""
        key = f"build-{secrets.token_hex(8)}"
        path = self.socket_dir / f"{key}.sock"
        self._logs[key] = log
        try:
            self._call(self.proxy.add_app(key, path, self.hosts))
            try:
                os.chown(path, uid, uid)
                path.chmod(0o600)
                yield path
            finally:
                self._call(self.proxy.remove_app(key))
        finally:
            self._logs.pop(key, None)

    def close(self) -> None:
        """Close every socket and stop the thread."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._call(self.proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=_CALL_TIMEOUT_S)

    def _log(self, key: str, message: str) -> None:
        log = self._logs.get(key)
        if log is not None:
            # The proxy speaks to apps; a build lists no hosts of its own.
            log("    " + message.replace("not in App(egress=[...])", "builds reach the package index only"))
