"""Log files of instances and deploys: JSON lines, capped in size, read by tail and follow.

The node agent writes them and the API reads them; on one machine they share the data dir.
Each record is one line: {"ts": epoch seconds, "source": ..., "stream": ..., "line": ...}.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["LogWriter", "follow", "read_tail"]

DEFAULT_CAP = 2 * 1024 * 1024


class LogWriter:
    """Appends records to a file; past `cap_bytes` the file moves to `<name>.1` and a new one starts."""

    def __init__(
        self, path: Path, *, source: str, cap_bytes: int = DEFAULT_CAP, keep_files: int | None = None
    ) -> None:
        """`keep_files`: also delete all but the newest that many logs of the folder (old instances')."""
        self.path = path
        self.source = source
        self.cap_bytes = cap_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_files is not None:
            _prune(path.parent, keep_files, keep=path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the writer's life
        self._size = self._file.tell()

    def write(self, line: str, stream: str = "stdout") -> None:
        rec = json.dumps(
            {"ts": round(time.time(), 6), "source": self.source, "stream": stream, "line": line},
            ensure_ascii=False,
        )
        self._file.write(rec + "\n")
        self._file.flush()
        self._size += len(rec) + 1
        if self._size > self.cap_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._size = 0

    def close(self) -> None:
        self._file.close()


def _prune(folder: Path, count: int, keep: Path) -> None:
    logs = sorted(
        (p for p in folder.glob("*.log") if p != keep), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in logs[count:]:
        for p in (old, old.with_name(old.name + ".1")):
            p.unlink(missing_ok=True)


def _parse(lines: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for raw in lines:
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue  # a torn last line after kill -9 is skipped, not fatal
    return out


def read_tail(paths: Iterable[Path], n: int) -> list[dict[str, Any]]:
    """The last `n` records across `paths` (and their rotated `.1` files), oldest first."""
    records: list[dict[str, Any]] = []
    for p in paths:
        for candidate in (p.with_name(p.name + ".1"), p):
            try:
                with open(candidate, encoding="utf-8", errors="replace") as f:
                    records.extend(_parse(f.readlines()[-n:] if n else []))
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
) -> AsyncIterator[dict[str, Any]]:
    """Yield the last `tail` records, then new ones as they are written (files may appear later)."""
    for rec in read_tail(list_paths(), tail):
        yield rec
    offsets: dict[Path, int] = {}
    for p in list_paths():
        offsets[p] = p.stat().st_size if p.exists() else 0
    while True:
        finished = until() if until else False
        new: list[dict[str, Any]] = []
        for p in list_paths():
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
                new.extend(_parse(complete.decode("utf-8", "replace").splitlines()))
            else:
                offsets[p] = size
        new.sort(key=lambda r: r.get("ts", 0))
        for rec in new:
            yield rec
        if finished:
            return
        await asyncio.sleep(poll_s)
