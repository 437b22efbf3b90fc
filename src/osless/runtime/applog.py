"""What an instance tells the node for its log: one access line per request, and the app's `logging`.

Each is a line marked with MARK and a JSON object, on the instance's stderr (access lines on a pipe
of their own once the node gives one, `use_access_fd`); the node appends the object to the
instance's log with its own `ts`, `source` and `stream` (unparsed: `osless.logs`), an access line's
(it starts `{"access":`) to a file of their own. These are written here, in the instance, as the
only place that knows a request's id, status, duration and whether it was the instance's first (the
gateway holds no request id, and is kept lean for throughput). What an instance writes is the app's
to fake, so these lines are app-trusted: an app can only fake lines of its own instances, in its own
log; the platform's own lines (stream "osless") come from the node.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from json.encoder import encode_basestring  # C, as json.dumps uses
from typing import Any

__all__ = [
    "MARK",
    "REQUEST_HEADER",
    "REQUEST_ID",
    "flush",
    "install_logging",
    "logged",
    "new_request_id",
    "use_access_fd",
]

# Starts a line the node reads as the runtime's (`logs.LogWriter.write_instance`); no app prints it by chance.
MARK = "\x1eosless:"
MAX_PATH_CHARS = 256  # of an access line (the node caps what it keeps again: the app could write it)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_HEADER = b"x-osless-request-id"
# The request being served, in its task (and, copied, in a sync handler's thread): `logging` records
# made while it runs carry it.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("osless_request_id", default=None)
_served = False  # this process served a request already: later ones are warm


# A request id: this process's random part and a count (unique without a read of the kernel's random
# source per request; made again in each fork, which must not repeat its parent's).
_id_prefix = ""
_id_count = itertools.count()


def _new_id_source() -> None:
    global _id_prefix, _id_count
    _id_prefix, _id_count = os.urandom(8).hex(), itertools.count()


_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)


def new_request_id() -> str:
    return f"{_id_prefix}{next(_id_count):016x}"


# Access lines wait a little to leave together: under load, one write (and one wake of the node) for
# many requests, not one each. A `logging` record sends those waiting first, so the order is kept.
_BATCH_S = 0.02
_PIPE_BUF = 4096  # a write no longer than this is never torn by another writer of the pipe
# On a pipe of their own (`use_access_fd`), which nothing else of the instance writes to, a batch may
# be longer than PIPE_BUF: 8 times fewer writes, and wakes of the node, than on stderr, whose lines
# the app's threads and children write too. Two gateways and two instances on two cores answered
# ~10% more so (`benchmarks/throughput.py`).
_OWN_PIPE_BATCH = 32 * 1024
_access_fd = 2  # where access lines go: the node's pipe for them once told (`use_access_fd`)
_batch = _PIPE_BUF
_pending = bytearray()  # access lines waiting
# `logging` records come from handlers' threads too, and from an app's signal handlers: those run in
# the middle of their thread's own write, which they must neither wait for (a deadlock) nor tear.
# `_enter` tells such a call apart by `_inside`, its thread's mark; what it logs waits in `_late`.
# A handler may also raise (KeyboardInterrupt, a SIGTERM handler's sys.exit): the lock must not stay
# taken then, or every other thread that logs waits forever, and this one's records wait in `_late`.
# Reentrant: owned by a thread, so a release by one that did not take it fails (`_enter`).
_lock = threading.RLock()


class _Inside(threading.local):
    inside = False  # this thread is taking the lock (`_enter`) or holding it, until its `finally`


_inside = _Inside()
_late = bytearray()  # records a signal handler made while its thread was inside
_timer: asyncio.TimerHandle | None = None


def use_access_fd(fd: int) -> None:
    """Write access lines to `fd`, a pipe of their own the node reads (in the instance, at its fork)."""
    global _access_fd, _batch
    _access_fd, _batch = fd, _OWN_PIPE_BATCH


def _forget_pending() -> None:
    # A child the app forks serves no request: the lines its parent had waiting are the parent's to
    # send. A lock another thread of the parent held at the fork would stay held in the child.
    global _timer, _lock, _inside
    _lock, _inside = threading.RLock(), _Inside()
    _pending.clear()
    _late.clear()
    _timer = None


os.register_at_fork(after_in_child=_forget_pending)


def _line(fields: dict[str, Any]) -> bytes:
    return (MARK + json.dumps(fields, ensure_ascii=False) + "\n").encode("utf-8", "replace")


def _out(data: bytes | bytearray, fd: int = 2) -> None:
    # Straight to the descriptor: an app that replaced sys.stderr does not lose the platform's lines.
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                # The app made the pipe non-blocking (a flag of the pipe, not of this descriptor: an
                # asyncio pipe transport on fd 2 sets it): wait as a blocking write does, not drop
                # the line (nor the rest of a batch, torn).
                _writable(fd)
    except OSError:
        pass  # the node closed our output: nobody to tell


def _writable(fd: int) -> None:
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    poll.poll()


def _take(data: bytes) -> bytes | None:
    """What waits, and `data` after it, to write now if they fit one write; else what waited alone
    (`data` then waits). Under the lock."""
    if len(_pending) + len(data) <= _batch:
        _pending.extend(data)
        return None
    out = bytes(_pending)
    _pending[:] = data
    return out


def _enter() -> bool:
    """Take the lock, or say False when this thread is taking or holding it already: a signal handler
    run in the middle of its own thread's write, which then leaves its record in `_late`."""
    if _inside.inside:
        return False
    # Marked before the lock is taken: a handler run while this thread waits for it, or just after,
    # logs to `_late` (the holder writes it before it lets go), and never takes the lock itself.
    _inside.inside = True
    try:
        _lock.acquire()
    except BaseException:  # a handler raised, while this waited or right after it took the lock
        _inside.inside = False
        # Released if taken, with no call before (a second handler could raise at any call's end,
        # `contextlib.suppress`'s `__enter__` too).
        try:  # noqa: SIM105
            _lock.release()
        except RuntimeError:
            pass  # not taken: it raised while this waited
        raise
    return True


def _drained() -> None:
    """Write what signal handlers logged while this thread held the lock."""
    while _late:
        late = bytes(_late)
        del _late[: len(late)]  # not clear(): a handler may have added one since the line above
        _out(late)


# Each holder lets the lock go in its own `finally`, written out there: a handler may raise on entry
# to any function called (a `_leave()` would then never run). No handler runs between `_drained`'s
# last look at `_late` and the mark's end (no call between): one run after the mark takes the lock
# itself (reentrant, until the release that follows).


def _sent_pending() -> None:
    # Taken before written: a handler's record that comes during the write never sends them twice.
    if _pending:
        out = bytes(_pending)
        _pending.clear()
        _out(out, _access_fd)


def flush() -> None:
    """Write the access lines that wait (before the instance exits, and on the batch's timer)."""
    global _timer
    _timer = None
    if _enter():
        try:
            _sent_pending()
            if _late:
                _drained()
        finally:
            _inside.inside = False
            _lock.release()


# Batches are written under the lock: one past PIPE_BUF is never torn by, nor passed by, another
# thread's (a handler thread's `logging` record sends those waiting).


def _write(fields: dict[str, Any]) -> None:
    """A `logging` record, on stderr: now, after the access lines that wait."""
    data = _line(fields)
    if not _enter():
        _late.extend(data)
        return
    try:
        _sent_pending()
        _out(data)
        if _late:
            _drained()
    finally:
        _inside.inside = False
        _lock.release()


def _write_access(data: bytes) -> None:
    """An access line, from the loop's thread: with the others of the next few milliseconds."""
    global _timer
    if not _enter():
        _late.extend(data)  # stderr takes it as well (access lines went there before they had a pipe)
        return
    try:
        out = _take(data)
        if out:
            _out(out, _access_fd)
        if _late:  # looked at here: a call costs every request
            _drained()
    finally:
        _inside.inside = False
        _lock.release()
    if _timer is None:
        _timer = asyncio.get_running_loop().call_later(_BATCH_S, flush)


async def logged(
    scope: Scope, receive: Receive, send: Send, call: ASGIApp, request_id: str, method: str, path: str
) -> None:
    """Serve a request with `call` under `request_id` (in `REQUEST_ID`, and in the answer's
    `x-osless-request-id` header), then write its access line."""
    global _served
    cold, _served = not _served, True
    started = time.perf_counter()
    answer = _Answer(send, request_id)
    token = REQUEST_ID.set(request_id)
    try:
        await call(scope, receive, answer.send)
    finally:
        REQUEST_ID.reset(token)
        ms = (time.perf_counter() - started) * 1000
        status = answer.status or 500  # it raised before answering: the server answers 500
        _write_access(_access_line(method[:32], path[:MAX_PATH_CHARS], status, ms, cold, request_id))


def _access_line(method: str, path: str, status: int, ms: float, cold: bool, request_id: str) -> bytes:
    """An access line's fields as JSON, written out by hand (a request pays no json.dumps), starting
    with "access" (the node keeps such lines apart unparsed, `osless.logs`). Its text for people
    ("GET /a 200 1.2ms warm") is made where the log is read, not here."""
    return (
        f'{MARK}{{"access":{{"method":{encode_basestring(method)},"path":{encode_basestring(path)},'
        f'"status":{status},"duration_ms":{ms:.3f},"cold":{"true" if cold else "false"}}},'
        f'"request":{encode_basestring(request_id)}}}\n'
    ).encode("utf-8", "replace")


_set = object.__setattr__
_HEADER_LEN = len(REQUEST_HEADER)


class _Answer:
    """`send`, noting the answer's status and adding the request's id to its headers. Its other
    attributes are those of the server's own `send.__self__` (uvicorn's request cycle): an app that
    reaches through `send` to the server finds what it would without the platform's wrapper."""

    __slots__ = ("_id", "_send", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        _set(self, "_send", send)
        _set(self, "_id", request_id.encode("latin-1"))
        _set(self, "status", 0)

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            _set(self, "status", int(message["status"]))
            headers = message.get("headers") or []
            if type(headers) is not list:  # any iterable: read once, here
                headers = list(headers)
                message = {**message, "headers": headers}
            for k, _ in headers:  # the length first: most headers are not this one
                if len(k) == _HEADER_LEN and bytes(k).lower() == REQUEST_HEADER:
                    break
            else:  # copies: the app's list may be one it sends again
                message = {**message, "headers": [*headers, (REQUEST_HEADER, self._id)]}
        await self._send(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._send.__self__, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._send.__self__, name, value)


def _level(levelno: int) -> str:
    for floor, name in ((50, "CRITICAL"), (40, "ERROR"), (30, "WARNING"), (20, "INFO")):
        if levelno >= floor:
            return name
    return "DEBUG"


class _Handler(logging.Handler):
    """The root logger's: each record, with its level, logger and the request it was made in."""

    def handle(self, record: logging.LogRecord) -> bool:
        # Without the handler's own lock: `_write` has its own, which a signal handler that raises
        # never leaves taken. `logging.Handler.handle` takes its lock in `acquire()`, where one that
        # raises right after leaves it taken, and every other thread's record waits forever.
        rv = self.filter(record)
        if isinstance(rv, logging.LogRecord):  # a filter may give a record in place (3.12)
            record = rv
        if rv:
            self.emit(record)
        return bool(rv)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            fields: dict[str, Any] = {
                "line": line,
                "level": _level(record.levelno),
                "logger": record.name[:256],
            }
            request = REQUEST_ID.get()
            if request is not None:
                fields["request"] = request
            _write(fields)
        except Exception:
            self.handleError(record)


def install_logging() -> None:
    """Before the app is imported: its `logging` records reach the instance's log, structured, at
    INFO and above, without the app configuring anything (as on AWS Lambda, where an app's own
    `logging.basicConfig()` is then a no-op: the root logger has a handler)."""
    root = logging.getLogger()
    if any(isinstance(h, _Handler) for h in root.handlers):
        return
    handler = _Handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    if root.level == logging.WARNING:  # Python's default: raised by no one yet
        root.setLevel(logging.INFO)
