"""Log files of instances and deploys: JSON lines, capped in size, read by tail and follow.

The node agent writes them and the API reads them; on one machine they share the data dir.
Each record is one line: {"ts": epoch seconds, "source": ..., "stream": ..., "line": ...}, and may
carry `request` (the request id), `level` and `logger` (an app's `logging` record), and `access`
(an access line's method, path, status, duration_ms and cold): see `extra_fields`.

Streams: "stdout" and "stderr" (what the instance wrote), "log" (its `logging` records) and "access"
(one line per request or invocation), both written by the runtime in the instance (so app-trusted:
an app can fake them, in its own log only); "osless" is the platform's own (the node's events), which
no app can write: the node sets the stream from where a line came, never from what it says.

A request must cost the node little: the runtime's marked lines (a JSON object) are not parsed where
they are written. The node appends the object as it came, with its own `ts`, `source` and `stream`
spliced in last (`LogWriter.write_instance`): a JSON reader keeps the last of a repeated key, so an
instance cannot say it is another, nor the platform, nor when; and a line that closes the object
early or leaves it open is no JSON at all. Their fields are checked where they are read
(`_parse`, with `extra_fields`), which is rare next to writing. An instance's access lines go to a
file of their own beside its log (`<id>.log.access`, capped and rotated the same way): a burst of
requests never rotates the app's own output away. Readers merge the two by time.

Under load the node is handed what one read of an instance's output brought (`write_instance_lines`):
a run of whole access lines in it is stamped and appended in one piece (two `bytes.replace` over the
run, in C), where a line at a time cost the node ~2.5 us a request and a fifth of the throughput of
two gateways and two instances on two cores (`benchmarks/throughput.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from json.encoder import encode_basestring  # C, as json.dumps uses
from pathlib import Path
from typing import Any

from osless.bounds import MAX_LINE_CHARS, cap
from osless.runtime.applog import MARK

__all__ = [
    "ACCESS_SUFFIX",
    "DELETED_PREFIX",
    "MARK",
    "MAX_FIELD_CHARS",
    "MAX_GREP_CHARS",
    "MAX_REQUEST_CHARS",
    "LogFilter",
    "LogWriter",
    "access_path",
    "access_text",
    "extra_fields",
    "follow",
    "instance_line",
    "read_tail",
    "remove_app_logs",
]

DEFAULT_CAP = 2 * 1024 * 1024
DELETED_PREFIX = ".deleted-"  # a deleted app's log folder, moved aside (no app name starts with a dot)
_NOTICE_ROOM = 512  # kept free at the end of a capped log for the line that says it was cut
ACCESS_SUFFIX = ".access"  # `<id>.log.access`: an instance's access lines, beside its log
_ACCESS_START = '{"access":'  # how the runtime starts an access line's object (an app may too: its own)
_RUNTIME_STREAMS = ("access", "log")
_MARK_LEN = len(MARK)
# A run of whole access lines as the runtime writes them (`applog._access_line`), each at a line's
# start: MARK, the object, the newline; printable ASCII only (what `write_instance` would take as it
# is), none longer than _RUN_LINE. Anything else is read a line at a time.
_RUN_LINE = 2048
_MARK_BYTES = MARK.encode()
_ACCESS_RUN = re.compile(
    rb"^(?:" + re.escape(_MARK_BYTES) + rb'\{"access":[\x20-\x7e]{0,%d}\}\n)+' % _RUN_LINE, re.M
)
_RUN_SLACK = 64  # what the node's fields add to a line, at most, besides its stamp (`_stamp`)


def access_path(path: Path) -> Path:
    return path.with_name(path.name + ACCESS_SUFFIX)


class LogWriter:
    """Appends records to a file that never grows past `cap_bytes`; each line is cut to fit.

    `rotate=True` (instances): past the cap the file moves to `<name>.1` and a new one starts, so the
    newest output is kept; access lines go to `<name>.access`, capped and rotated alike. `rotate=False`
    (a build): the file stops at its cap, its last line saying so.
    """

    def __init__(
        self,
        path: Path,
        *,
        source: str,
        cap_bytes: int = DEFAULT_CAP,
        rotate: bool = True,
        keep_files: int | None = None,
    ) -> None:
        """`keep_files`: also delete all but the newest that many logs of the folder (old instances')."""
        if cap_bytes < 4 * _NOTICE_ROOM:
            raise ValueError(f"a log's cap must be at least {4 * _NOTICE_ROOM} bytes, not {cap_bytes}")
        self.path = path
        self.source = source
        self.cap_bytes = cap_bytes
        self.rotate = rotate
        # A character takes at most 6 bytes in a record (a JSON escape): a line always fits the cap.
        self._line_chars = min(MAX_LINE_CHARS, cap_bytes // 16)
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_files is not None:
            _prune(path.parent, keep_files, keep=path)
        self._file = open(path, "ab")  # noqa: SIM115 - kept open for the writer's life
        self._size = self._file.tell()
        self._full = not rotate and self._size >= cap_bytes - _NOTICE_ROOM
        self._flush_due = False
        # What the node stamps on a runtime's line, after the instance's own fields (see the module).
        self._stamp = f',"source":{encode_basestring(source)},"stream":'
        # A record of a run's longest line, which `write_instance` would never cut (its cap's quarter).
        self._run_room = _RUN_LINE + _RUN_SLACK + len(self._stamp.encode())
        self._access: LogWriter | None = None  # made at the first access line

    def write(self, line: str, stream: str = "stdout", extra: dict[str, Any] | None = None) -> None:
        """`extra`: fields besides the line (`extra_fields`), already checked."""
        if self._full:
            return
        rec = self._record(cap(line, self._line_chars), stream, extra)
        if not self.rotate and self._size + len(rec) > self.cap_bytes - _NOTICE_ROOM:
            self._full = True
            rec = self._record(
                f"log cut: it reached its cap of {self.cap_bytes} bytes; later lines were dropped", "osless"
            )
        self._append(rec)

    def write_instance(self, line: str, stream: str) -> None:
        """A line an instance wrote on `stream`: a runtime's marked line (an access line, a `logging`
        record) is appended as it came with the node's fields spliced in, unparsed; any other is the
        app's own output (`write`)."""
        if not (line.startswith(MARK) and line.endswith("}") and line.startswith("{", _MARK_LEN)):
            self.write(line, stream)
            return
        body = line[_MARK_LEN:-1]
        if not body.isprintable():
            # A control character (JSON has none raw: the runtime's lines never do) or what some
            # reader takes for a line's end (\r, \u2028, ...: str.splitlines, a text file's
            # universal newlines), which might hold a whole record of its own: parsed and written
            # again, escaped.
            self.write(*instance_line(line, stream))
            return
        kind = "access" if body.startswith(_ACCESS_START) else "log"
        rec = f'{body},"ts":{time.time():.6f}{self._stamp}"{kind}"}}\n'.encode("utf-8", "replace")
        if len(rec) > self.cap_bytes // 4 or self._full:
            self.write(*instance_line(line, stream))  # parsed and cut to fit, as any line
        elif kind == "access" and self.rotate:
            self._access_log()._append(rec)
        else:
            self._append(rec)

    def write_instance_lines(self, block: bytes, stream: str, max_line: int) -> None:
        """Whole lines an instance wrote on `stream` (`block` ends with a newline), as
        `write_instance` takes them one by one (each cut at `max_line` bytes), but a run of access
        lines appended at once: the same records, each with the same `ts` (when the run was read)."""
        pos = 0
        if self.rotate and not self._full and self.cap_bytes // 4 >= self._run_room:
            for run in _ACCESS_RUN.finditer(block):
                self._lines(block[pos : run.start()], stream, max_line)
                pos = run.end()
                suffix = f',"ts":{time.time():.6f}{self._stamp}"access"}}\n'.encode()
                recs = run.group().replace(_MARK_BYTES, b"").replace(b"}\n", suffix)
                access = self._access_log()
                if access._size + len(recs) > access.cap_bytes:
                    # It would rotate within the run: line by line, so the file is cut where those
                    # would cut it, never past its cap (a run may be longer than a small cap).
                    self._lines(run.group(), stream, max_line)
                else:
                    access._append(recs)
        self._lines(block[pos:], stream, max_line)

    def _access_log(self) -> LogWriter:
        if self._access is None:  # made at the first access line
            self._access = LogWriter(access_path(self.path), source=self.source, cap_bytes=self.cap_bytes)
        return self._access

    def _lines(self, block: bytes, stream: str, max_line: int) -> None:
        for line in block.split(b"\n")[:-1]:
            self.write_instance(line[:max_line].decode("utf-8", "replace"), stream)

    def _append(self, rec: bytes) -> None:
        if self.rotate and self._size and self._size + len(rec) > self.cap_bytes:
            self._rotate()
        self._file.write(rec)
        self._size += len(rec)
        self._flush_soon()

    def _flush_soon(self) -> None:
        # On a loop, once at the end of its turn: the lines one read of an instance's output brought
        # (a batch of access lines under load) cost one write, not one each.
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._file.flush()
            return
        self._flush_due = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if not self._file.closed:
            self._file.flush()

    def _record(self, line: str, stream: str, extra: dict[str, Any] | None = None) -> bytes:
        if extra:
            record = {"ts": round(time.time(), 6), "source": self.source, "stream": stream, "line": line}
            record.update(extra)
            return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        # What json.dumps would write, without building a dict for it: the node's most common line.
        return (
            f'{{"ts":{time.time():.6f}{self._stamp}{encode_basestring(stream)},"line":{encode_basestring(line)}}}\n'
        ).encode("utf-8", "replace")

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        # What an instance's pipes still bring (read after its end) is dropped: never written to a
        # closed file (an error at each read, forever at EOF), nor to a new access file in a folder
        # the writer's owner may have removed (a deleted app's).
        self._full = True
        self._file.close()
        if self._access is not None:
            self._access.close()


async def remove_app_logs(folder: Path) -> None:
    """A deleted app's log folder: moved aside at once (one rename: a new app of the same name never
    reads it), then removed off the loop."""
    gone = folder.with_name(f"{DELETED_PREFIX}{folder.name}-{secrets.token_hex(4)}")
    try:
        folder.rename(gone)
    except FileNotFoundError:
        return
    await asyncio.to_thread(shutil.rmtree, gone, True)


def _prune(folder: Path, count: int, keep: Path) -> None:
    logs = sorted(
        (p for p in folder.glob("*.log") if p != keep), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in logs[count:]:
        for p in _files_of(old):
            p.unlink(missing_ok=True)


def _files_of(path: Path) -> tuple[Path, ...]:
    """A log's files, oldest first within each: rotated, current; its access lines' the same."""
    access = access_path(path)
    return (path.with_name(path.name + ".1"), path, access.with_name(access.name + ".1"), access)


def _parse(lines: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for raw in lines:
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError):
            continue  # a torn last line after kill -9 is skipped, not fatal; an instance's bad line too
        if not isinstance(rec, dict):
            continue
        if rec.get("stream") in _RUNTIME_STREAMS:  # an instance's fields: checked here (see the module)
            extra = extra_fields(rec)
            line = rec.get("line")
            if "access" in extra and line is None:
                line = access_text(extra["access"])
            elif not isinstance(line, str):
                continue
            rec = {
                "ts": rec.get("ts"),
                "source": rec.get("source"),
                "stream": "access" if "access" in extra else "log",
                "line": cap(line, MAX_LINE_CHARS),
                **extra,
            }
        out.append(rec)
    return out


def read_tail(paths: Iterable[Path], n: int, match: LogFilter | None = None) -> list[dict[str, Any]]:
    """The last `n` records across `paths` (with their rotated `.1` files and their access lines')
    that `match`, oldest first."""
    records: list[dict[str, Any]] = []
    for p in paths:
        for candidate in _files_of(p):
            try:
                # Records end at "\n" only (see `LogWriter.write_instance`).
                with open(candidate, encoding="utf-8", errors="replace", newline="\n") as f:
                    if match is None:
                        records.extend(_parse(f.readlines()[-n:] if n else []))
                    elif n:  # a log is at most its cap (twice, rotated): read whole, then filtered
                        records.extend([r for r in _parse(f.readlines()) if match(r)][-n:])
            except FileNotFoundError:
                continue
    records.sort(key=lambda r: r.get("ts", 0))
    return records[-n:] if n else []


async def follow(
    list_paths: Callable[[], Iterable[Path]],
    *,
    tail: int,
    poll_s: float = 0.1,
    until: Callable[[], bool] | None = None,
    match: LogFilter | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the last `tail` records, then new ones as they are written (files may appear later);
    only those that `match`, when given. A log's access lines' file is followed with it."""

    def current() -> list[Path]:
        return [q for p in list_paths() for q in (p, access_path(p))]

    for rec in await asyncio.to_thread(read_tail, list_paths(), tail, match):  # off the loop, as it reads
        yield rec
    offsets: dict[Path, int] = {}
    for p in current():
        offsets[p] = p.stat().st_size if p.exists() else 0
    while True:
        finished = until() if until else False
        new: list[dict[str, Any]] = []
        for p in current():
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                continue
            start = offsets.get(p, 0)
            if size < start:  # rotated underneath us
                start = 0
            if size > start:
                with open(p, "rb") as f:
                    f.seek(start)
                    chunk = f.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offsets[p] = start + len(complete)
                new.extend(_parse(complete.decode("utf-8", "replace").split("\n")[:-1]))
            else:
                offsets[p] = size
        new.sort(key=lambda r: r.get("ts", 0))
        for rec in new:
            if match is None or match(rec):
                yield rec
        if finished:
            return
        await asyncio.sleep(poll_s)


# What a filter may hold: a --grep is a plain substring (never a regex: a user's regex could take
# exponential time on the node), a request id is an id.
MAX_GREP_CHARS = 256
MAX_REQUEST_CHARS = 64


class LogFilter:
    """Which records a reader wants: since a time, holding a substring, of one request. Applied
    where the logs are (the node), so what is dropped is never sent."""

    def __init__(self, *, since: float | None = None, grep: str | None = None, request: str | None = None):
        self.since = since
        self.grep = grep or None
        self.request = request or None

    def __bool__(self) -> bool:
        return self.since is not None or self.grep is not None or self.request is not None

    def __call__(self, rec: dict[str, Any]) -> bool:
        if self.since is not None and rec.get("ts", 0) < self.since:
            return False
        if self.request is not None and rec.get("request") != self.request:
            return False
        return self.grep is None or self.grep in str(rec.get("line", ""))


# The runtime in an instance marks the lines it writes for the node (access lines, `logging` records)
# with MARK and a JSON object; an app writing one only fakes lines of its own instance's log.
MAX_FIELD_CHARS = 256  # an access line's path, a logger's name
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def extra_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The extra fields of a record that are well formed, capped; the rest dropped. The same check
    where a line is first parsed (the node) and where a node's record is passed on (the API)."""
    out: dict[str, Any] = {}
    request = raw.get("request")
    if isinstance(request, str) and 0 < len(request) <= MAX_REQUEST_CHARS:
        out["request"] = request
    level = raw.get("level")
    if isinstance(level, str) and level in _LEVELS:
        out["level"] = level
    logger = raw.get("logger")
    if isinstance(logger, str) and logger:
        out["logger"] = cap(logger, MAX_FIELD_CHARS)
    access = raw.get("access")
    if isinstance(access, dict):
        method, path, status = access.get("method"), access.get("path"), access.get("status")
        duration, cold = access.get("duration_ms"), access.get("cold")
        if (
            isinstance(method, str)
            and isinstance(path, str)
            and isinstance(status, int)
            and not isinstance(status, bool)
            and 0 <= status <= 999  # an HTTP status: an app's line could hold a 4,000-digit number
            and isinstance(duration, int | float)
            and not isinstance(duration, bool)
            and duration == duration  # not NaN
            and isinstance(cold, bool)
        ):
            out["access"] = {
                "method": cap(method, 32),
                "path": cap(path, MAX_FIELD_CHARS),
                "status": status,
                "duration_ms": round(float(min(max(duration, 0.0), 1e9)), 3),
                "cold": cold,
            }
    return out


def instance_line(line: str, stream: str) -> tuple[str, str, dict[str, Any] | None]:
    """(line, stream, extra fields) of what an instance wrote: a marked line is the runtime's (an
    access line or a `logging` record); any other is the app's own output, as it is."""
    if not line.startswith(MARK):
        return line, stream, None
    try:
        raw = json.loads(line[len(MARK) :])
    except (ValueError, RecursionError):  # a nesting too deep is not a record either
        return line, stream, None
    if not isinstance(raw, dict):
        return line, stream, None
    extra = extra_fields(raw)
    text = raw.get("line")
    if "access" in extra and text is None:
        text = access_text(extra["access"])
    if not isinstance(text, str):
        return line, stream, None
    kind = "access" if "access" in extra else "log"
    return text, kind, extra


def access_text(access: dict[str, Any]) -> str:
    """An access line as people read it, from its fields (checked by `extra_fields`)."""
    warm = "cold" if access["cold"] else "warm"
    return f"{access['method']} {access['path']} {access['status']} {access['duration_ms']:.1f}ms {warm}"
