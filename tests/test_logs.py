"""Log files: a true cap whatever is written to them, rotation, tail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from osless.logs import LogWriter, read_tail

CAP = 64 * 1024


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_one_huge_line_is_cut_to_fit(tmp_path: Path) -> None:
    for rotate in (True, False):
        path = tmp_path / f"{rotate}.log"
        w = LogWriter(path, source="i-1", cap_bytes=CAP, rotate=rotate)
        w.write("x" * (50 << 20))
        w.write("after")
        w.close()
        assert path.stat().st_size <= CAP
        first, second = _records(path)
        line = str(first["line"])
        assert line.startswith("xxx") and "characters cut" in line and len(line) <= CAP // 16
        assert second["line"] == "after"


def test_escaped_characters_count_as_the_bytes_they_take(tmp_path: Path) -> None:
    # A control character takes six bytes in JSON (\u0001), a CJK one three in UTF-8.
    path = tmp_path / "a.log"
    w = LogWriter(path, source="i-1", cap_bytes=CAP, rotate=False)
    for _ in range(50):
        w.write("\x01" * 100_000)
        w.write("雪" * 100_000)
    w.close()
    assert path.stat().st_size <= CAP


def test_a_flood_stops_at_the_cap_and_says_so_once(tmp_path: Path) -> None:
    path = tmp_path / "d-1.log"
    w = LogWriter(path, source="d-1", cap_bytes=CAP, rotate=False)
    for i in range(100_000):
        w.write(f"line {i}")
    w.close()
    assert path.stat().st_size <= CAP
    records = _records(path)
    assert records[0]["line"] == "line 0"
    notes = [r for r in records if "cap" in str(r["line"])]
    assert notes == [records[-1]] and records[-1]["stream"] == "osless"
    assert f"reached its cap of {CAP} bytes; later lines were dropped" in str(records[-1]["line"])
    # Opened again, a full log stays as it is.
    again = LogWriter(path, source="d-1", cap_bytes=CAP, rotate=False)
    again.write("more")
    again.close()
    assert _records(path) == records


def test_a_rotated_log_keeps_the_newest_within_twice_its_cap(tmp_path: Path) -> None:
    path = tmp_path / "i-1.log"
    w = LogWriter(path, source="i-1", cap_bytes=CAP)
    for i in range(100_000):
        w.write(f"line {i}" + ("y" * 5000 if i % 7 == 0 else ""))
        assert path.stat().st_size <= CAP
    w.close()
    old = path.with_name("i-1.log.1")
    assert old.stat().st_size <= CAP
    assert [r["line"] for r in read_tail([path], 2)] == ["line 99998", "line 99999"]


def test_a_tiny_cap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2048 bytes"):
        LogWriter(tmp_path / "x.log", source="x", cap_bytes=100)
