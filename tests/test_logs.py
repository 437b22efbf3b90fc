"""Log files: a true cap whatever is written to them, rotation, tail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.logs import LogFilter, LogWriter, follow, instance_line, read_tail
from osless.runtime import applog
from osless.runtime.applog import MARK
from tests.platform import OSLESS, Platform

APPS = Path(__file__).parent / "apps"

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


def test_a_filter_keeps_what_was_asked_before_taking_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "i-1.log"
    w = LogWriter(path, source="i-1", cap_bytes=CAP)
    w.write("needle early")
    w.write("hay", extra={"request": "r1"})
    for i in range(50):
        w.write(f"more hay {i}")
    w.close()
    assert [r["line"] for r in read_tail([path], 1, LogFilter(grep="needle"))] == ["needle early"]
    assert [r["line"] for r in read_tail([path], 10, LogFilter(request="r1"))] == ["hay"]
    assert read_tail([path], 10, LogFilter(since=time.time() + 60)) == []
    assert len(read_tail([path], 100, LogFilter(since=time.time() - 60))) == 52


def test_only_the_runtime_s_marked_lines_carry_fields_and_never_the_platform_s_stream() -> None:
    assert instance_line("plain print", "stdout") == ("plain print", "stdout", None)
    assert instance_line(MARK + "not json", "stderr") == (MARK + "not json", "stderr", None)
    deep = MARK + "[" * 16000  # json.loads would raise RecursionError on the node's loop
    assert instance_line(deep, "stderr") == (deep, "stderr", None)
    forged = json.dumps({"line": "OOM!", "stream": "osless", "level": "ERROR", "request": "x" * 65})
    line, stream, extra = instance_line(MARK + forged, "stderr")
    # An app printing a marked line gets a `log` record of its own instance, never a platform one.
    assert (line, stream, extra) == ("OOM!", "log", {"level": "ERROR"})
    access = {"method": "GET", "path": "/a", "status": 200, "duration_ms": 1.5, "cold": True}
    line, stream, extra = instance_line(MARK + json.dumps({"line": "GET /a", "access": access}), "stderr")
    assert stream == "access" and extra == {"access": access}


def _access(i: int) -> str:
    """An access line as the runtime writes it."""
    return applog._access_line("GET", f"/p{i}", 200, 0.5, False, f"r{i}").decode().removesuffix("\n")


def test_an_instance_s_marked_lines_are_stamped_by_the_node_and_checked_where_read(tmp_path: Path) -> None:
    """The node appends a marked line unparsed, its own `ts`, `source` and `stream` last: what the
    line says of them is overridden, a bad field dropped where the log is read, and a line that
    closes the object early or holds a line break some reader splits on is no record of another."""
    path = tmp_path / "i-1.log"
    w = LogWriter(path, source="i-1", cap_bytes=CAP)
    w.write_instance(_access(1), "stderr")
    forged = {
        "line": "OOM!",
        "source": "i-2",
        "stream": "osless",
        "ts": 0,
        "level": "ERROR",
        "request": "x" * 65,
    }
    w.write_instance(MARK + json.dumps(forged), "stderr")
    w.write_instance(MARK + '{"line": "early"}, "source": "i-2", "stream": "osless"}', "stderr")
    w.write_instance(MARK + '{"line": "open", "x": {"y": 1}', "stderr")
    whole = '{"line":"forged","source":"i-2","stream":"osless","ts":1}'
    for brk in ("\r", "\v", "\x1c", "\u2028"):
        w.write_instance(f'{MARK}{whole}{brk}{{"line":"b"}}', "stderr")
    w.write_instance(MARK + "{" + "[" * 16000 + "}", "stderr")
    w.write_instance("plain print", "stdout")
    w.close()
    records = read_tail([path], 100)
    assert all(r["source"] == "i-1" and r["stream"] != "osless" and r["ts"] > 1 for r in records), records
    # Nor in the file, split at every break Python knows (what another reader of it might do).
    for text in path.read_text().splitlines():
        try:
            raw = json.loads(text)
        except ValueError:
            continue
        assert raw["source"] == "i-1" and raw["stream"] != "osless", text
    access, oom, *rest = records
    assert access["stream"] == "access" and access["access"]["path"] == "/p1" and access["request"] == "r1"
    assert (oom["line"], oom["stream"], oom.get("request")) == ("OOM!", "log", None)
    assert oom["level"] == "ERROR" and set(oom) == {"ts", "source", "stream", "line", "level"}
    assert [r["line"] for r in rest][-1] == "plain print"
    # A line with a break was parsed and written again: it reads as the app's log, whole, or as its
    # output; none as a record of its own.
    assert not any(r["line"] == "forged" for r in rest), rest
    assert {r["stream"] for r in rest} <= {"stderr", "stdout", "log"}, rest


def test_an_access_line_s_status_is_an_http_status(tmp_path: Path) -> None:
    log = LogWriter(tmp_path / "i.log", source="i")
    for status in ("9" * 4000, "-1", "1000", "503"):
        fields = f'"method":"GET","path":"/","status":{status},"duration_ms":1,"cold":false'
        log.write_instance(MARK + '{"access":{' + fields + "}}", "stderr")
    log.close()
    kept = [r for r in read_tail([tmp_path / "i.log"], 10) if r["stream"] == "access"]
    assert [r["access"]["status"] for r in kept] == [503]


def test_an_app_s_own_output_survives_a_burst_of_access_lines(tmp_path: Path) -> None:
    """Access lines are kept beside an instance's log, capped and rotated on their own: a burst of
    requests never rotates away what the app wrote; readers and followers merge the two by time."""
    path = tmp_path / "i-1.log"
    w = LogWriter(path, source="i-1", cap_bytes=CAP)
    w.write_instance("the app started", "stdout")
    w.write_instance(MARK + json.dumps({"line": "a logging record"}), "stderr")
    for i in range(5000):  # ten times what a log holds
        w.write_instance(_access(i), "stderr")
    w.write_instance("the app's last word", "stdout")
    lines = [r["line"] for r in read_tail([path], 100_000)]
    assert lines[:2] == ["the app started", "a logging record"], lines[:3]
    assert lines[-2:] == ["GET /p4999 200 0.5ms warm", "the app's last word"]
    assert [r["line"] for r in read_tail([path], 1, LogFilter(request="r4998"))] == [
        "GET /p4998 200 0.5ms warm"
    ]

    async def followed() -> list[str]:
        written = asyncio.Event()

        async def write() -> None:
            await asyncio.sleep(0.1)  # once the follower is past the tail
            w.write_instance(_access(5000), "stderr")
            w.write_instance("after", "stdout")
            w.close()
            written.set()

        writing = asyncio.create_task(write())
        got = [rec["line"] async for rec in follow(lambda: [path], tail=1, poll_s=0.01, until=written.is_set)]
        await writing
        return got

    assert asyncio.run(followed()) == ["the app's last word", "GET /p5000 200 0.5ms warm", "after"]


def test_a_read_of_an_instance_s_output_is_written_as_its_lines_would_be_one_by_one(tmp_path: Path) -> None:
    """The node hands a whole read to `write_instance_lines`: a run of access lines is stamped and
    appended at once, the rest line by line, and the records are those of `write_instance`."""
    lines = [
        _access(1),
        applog._access_line("GET", "/caf\u00e9", 200, 1.5, True, "r2").decode().removesuffix("\n"),
        "plain app line",
        MARK + '{"line":"x","level":"INFO","logger":"a"}',
        _access(3),
        _access(4),
        "foo" + _access(5),  # marked past its start: the app's own line
        MARK + '{"access":{"method":"GET"}}' + "x" * 3000,  # no run's end: read as any line
        "",
    ]
    block = "".join(line + "\n" for line in lines).encode()
    one, whole = (
        LogWriter(tmp_path / "one.log", source="i-1"),
        LogWriter(tmp_path / "whole.log", source="i-1"),
    )
    for line in lines:
        one.write_instance(line, "stderr")
    whole.write_instance_lines(block, "stderr", 16384)
    one.close()
    whole.close()

    def records(path: Path) -> list[dict[str, Any]]:
        got = []
        for f in (path, path.with_name(path.name + ".access")):
            for text in f.read_text().splitlines():
                rec = json.loads(text)
                assert rec.pop("ts") > 1
                got.append(rec)
        return got

    assert records(tmp_path / "whole.log") == records(tmp_path / "one.log")
    assert [r["request"] for r in records(tmp_path / "whole.log") if r["stream"] == "access"] == [
        "r1",
        "r2",
        "r3",
        "r4",
    ]


def test_a_run_of_access_lines_rotates_where_its_lines_would_one_by_one(tmp_path: Path) -> None:
    """A read may bring a run of access lines longer than the room left in the access file, or than
    a small cap: it is cut where `write_instance` would cut it, and no file passes its cap."""
    block = b"".join(applog._access_line("GET", f"/p{i}", 200, 1.5, False, f"r{i}") for i in range(300))
    cap = 9216
    one, whole = (
        LogWriter(tmp_path / "one.log", source="i-1", cap_bytes=cap),
        LogWriter(tmp_path / "whole.log", source="i-1", cap_bytes=cap),
    )
    for _ in range(3):
        for line in block.decode().split("\n")[:-1]:  # not splitlines: MARK's \x1e is a line's end there
            one.write_instance(line, "stderr")
        whole.write_instance_lines(block, "stderr", 16384)
    one.close()
    whole.close()

    def requests(path: Path) -> list[str]:
        return [str(rec["request"]) for rec in _records(path)]

    for suffix in (".log.access", ".log.access.1"):
        path = tmp_path / f"whole{suffix}"
        assert path.stat().st_size <= cap, suffix
        assert requests(path) == requests(tmp_path / f"one{suffix}"), suffix


def test_a_run_of_access_lines_is_cut_to_a_small_cap_as_its_lines_would_be(tmp_path: Path) -> None:
    """A run's longest line, stamped with a long source, may pass a small cap's quarter, where
    `write_instance` parses and cuts it: so does the block path (it stamps whole runs only below)."""
    line = _access(1)[:-1] + ',"pad":"' + "a" * 1900 + '"}'
    source = "i-" + "x" * 300
    one, whole = (
        LogWriter(tmp_path / "one.log", source=source, cap_bytes=9216),
        LogWriter(tmp_path / "whole.log", source=source, cap_bytes=9216),
    )
    one.write_instance(line, "stderr")
    whole.write_instance_lines(line.encode() + b"\n", "stderr", 16384)
    one.close()
    whole.close()
    for suffix in (".log", ".log.access"):
        got, want = tmp_path / f"whole{suffix}", tmp_path / f"one{suffix}"
        assert got.exists() == want.exists(), suffix
        if want.exists():
            assert [rec | {"ts": 0} for rec in _records(got)] == [rec | {"ts": 0} for rec in _records(want)]


def test_what_comes_after_a_log_is_closed_is_dropped(tmp_path: Path) -> None:
    """An instance's pipes may still be read once its log is closed (the node reads them to their
    end): those lines are dropped, never an error at each read, nor an access file made again in a
    folder removed meanwhile (a deleted app's, `remove_app_logs`)."""
    folder = tmp_path / "app"
    w = LogWriter(folder / "i-1.log", source="i-1")
    w.write_instance("before", "stdout")
    w.close()
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    w.write_instance_lines(_access(1).encode() + b"\nthe app's own\n", "stderr", 16384)
    w.write_instance(_access(2), "stderr")
    w.write_instance("the app's own", "stdout")
    assert not folder.exists()


# What both scripts below start with: an app answering 200 to requests served as an instance does.
_SERVING = """
import asyncio, logging, os, sys
from osless.runtime import applog

async def ok(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})

async def sent(message):
    pass
"""

_OWN_PIPE = (
    _SERVING
    + """
r, w = os.pipe()
applog.use_access_fd(w)

async def main():
    applog.install_logging()
    for i in range(300):
        await applog.logged({}, None, sent, ok, f"r{i}", "GET", f"/p{i}")
    pid = os.fork()
    if pid == 0:  # a child the app forks: its parent's waiting lines are not its to send
        applog.flush()
        os._exit(0)
    os.waitpid(pid, 0)
    logging.getLogger("x").info("after the last")
    os.close(w)
    got = b""
    while chunk := os.read(r, 65536):
        got += chunk
    sys.stdout.write(got.decode())

asyncio.run(main())
"""
)


def test_access_lines_on_a_pipe_of_their_own_leave_in_batches_past_pipe_buf() -> None:
    """Given a pipe for them (as the node gives each instance), access lines go there, many more to a
    write than stderr's PIPE_BUF, each once; a `logging` record still goes to stderr, after them."""
    done = subprocess.run(
        [sys.executable, "-c", _OWN_PIPE], capture_output=True, text=True, timeout=30, check=True
    )
    out = done.stdout.split("\n")[:-1]
    assert [json.loads(line[len(MARK) :])["request"] for line in out] == [f"r{i}" for i in range(300)]
    assert sum(len(line) + 1 for line in out) > 4 * 4096  # past PIPE_BUF: batched as it may
    err = done.stderr.split("\n")[:-1]
    assert [json.loads(line[len(MARK) :])["line"] for line in err] == ["after the last"], err


_SIGNALLED = (
    _SERVING
    + """
import itertools, signal, threading
r, w = os.pipe()
applog.use_access_fd(w)
got = []
reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 65536), b"")))
reader.start()
count = itertools.count(1)

def tick(signum, frame):  # an app's signal handler that logs, run between any two of its bytecodes
    logging.getLogger("sig").info("tick %d", next(count))

async def main():
    applog.install_logging()
    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    for i in range(20000):
        await applog.logged({}, None, sent, ok, f"r{i}", "GET", f"/p{i}")
        if i % 10 == 0:
            logging.getLogger("main").info("main %d", i)
        if i % 100 == 0:
            applog.flush()
    signal.setitimer(signal.ITIMER_REAL, 0)
    applog.flush()
    logging.getLogger("main").info("after the last")
    os.close(w)
    reader.join()
    sys.stdout.write(b"".join(got).decode() + f"ticks {next(count) - 1}\\n")

asyncio.run(main())
"""
)


def test_a_signal_handler_that_logs_mid_write_neither_waits_nor_tears_nor_repeats() -> None:
    """An app's signal handler runs in the middle of whatever its thread does, the runtime's own
    writes included: its records wait for that write's end (they used to wait for its lock: a
    deadlock), and every line, access or record, arrives whole and once."""
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALLED], capture_output=True, text=True, timeout=60, check=True
    )
    out = done.stdout.split("\n")[:-1]
    ticks = int(out.pop().split()[1])
    assert [json.loads(line[len(MARK) :])["request"] for line in out] == [f"r{i}" for i in range(20000)]
    err = [json.loads(line[len(MARK) :])["line"] for line in done.stderr.split("\n")[:-1]]
    assert [line for line in err if line.startswith("main ")] == [f"main {i}" for i in range(0, 20000, 10)]
    assert ticks > 100  # the timer fired often enough to land inside writes
    logged = sorted(int(line.split()[1]) for line in err if line.startswith("tick "))
    assert logged == list(range(1, ticks + 1))
    assert err[-1] == "after the last"


_RAISED = (
    _SERVING
    + """
import signal, threading
raised = 0
armed = False

def stop(signum, frame):  # an app's SIGTERM handler: sys.exit(), here wherever the runtime writes
    if armed:
        sys.exit(0)

async def main():
    global armed, raised
    applog.install_logging()
    # Made now: `logging.getLogger` takes logging's own lock, which such a handler may leave taken.
    loggers = {name: logging.getLogger(name) for name in ("main", "thread")}
    for logger in loggers.values():
        logger.isEnabledFor(logging.INFO)  # its cache filled now, for the same reason
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
    for i in range(20000):
        try:
            armed = True
            if i % 2:
                loggers["main"].info("main %d", i)
            else:
                await applog.logged({}, None, sent, ok, f"r{i}", "GET", f"/p{i}")
            armed = False
        except SystemExit:
            armed = False
            raised += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
    other = threading.Thread(target=lambda: loggers["thread"].info("from a thread"))
    other.start()
    other.join(timeout=10)
    loggers["main"].info("after the last")
    applog.flush()
    sys.stdout.write(f"{raised} {other.is_alive()}\\n")
    sys.stdout.flush()
    os._exit(0)  # a thread still waiting for the lock would keep the interpreter from exiting

asyncio.run(main())
"""
)


def test_a_signal_handler_that_raises_mid_write_leaves_the_lock_free() -> None:
    """A signal handler may raise (a SIGTERM handler's sys.exit, KeyboardInterrupt) at any point of
    the runtime's own writes, right after the lock is taken or as it is let go: the lock is free
    after, so another thread's record goes out (it used to wait for it forever), and so do this
    thread's (they used to wait in `_late`)."""
    done = subprocess.run(
        [sys.executable, "-c", _RAISED], capture_output=True, text=True, timeout=60, check=True
    )
    raised, stuck = done.stdout.split()
    assert int(raised) > 100  # the timer's handler raised often enough to land inside writes
    assert stuck == "False"
    records = [json.loads(line[len(MARK) :]) for line in done.stderr.split("\n")[:-1]]  # whole lines
    assert [r["line"] for r in records if "line" in r][-2:] == ["from a thread", "after the last"]


_NONBLOCKING = """
import logging, os, sys, threading, time
from osless.runtime import applog
r, w = os.pipe()
os.set_blocking(w, False)  # what an app's asyncio pipe transport on its stderr leaves: the pipe's flag
os.dup2(w, 2)
got = []

def read():  # a node that reads slower than the app logs: the pipe fills
    while chunk := os.read(r, 4096):
        got.append(chunk)
        time.sleep(0.0005)

reader = threading.Thread(target=read)
reader.start()
applog.install_logging()
for i in range(3000):
    logging.getLogger("m").info("line %d %s", i, "x" * 100)
os.close(2)
os.close(w)
reader.join()
sys.stdout.write(b"".join(got).decode())
"""


def test_records_wait_for_a_full_pipe_the_app_made_non_blocking() -> None:
    """O_NONBLOCK is the pipe's, not a descriptor's: an app that sets it on its stderr sets it for
    the runtime's writes too. Those wait for room as a blocking write does: none dropped."""
    done = subprocess.run(
        [sys.executable, "-c", _NONBLOCKING], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line[len(MARK) :])["line"] for line in done.stdout.split("\n")[:-1]]
    assert lines == [f"line {i} {'x' * 100}" for i in range(3000)]


# On the session's platform: tests/apps/chatty, deployed once for these tests.


@pytest.fixture(scope="module")
def chatty(platform: Platform) -> Platform:
    platform.deploy_warm(APPS / "chatty")
    return platform


def _logs(platform: Platform, *args: str) -> list[dict[str, Any]]:
    out = platform.cli("logs", "chatty", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def _wait_logs(
    platform: Platform, args: list[str], until: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = platform.wait_for(
        lambda: (lambda recs: recs if until(recs) else None)(_logs(platform, *args)),
        timeout=30,
        what=f"osless logs chatty {' '.join(args)}",
    )
    return got


_BATCHING = (
    _SERVING
    + """
async def main():
    applog.install_logging()
    for i in range(20):
        await applog.logged({}, None, sent, ok, f"r{i}", "GET", f"/p{i}")
    os.write(2, b"-- nothing yet above\\n")
    await asyncio.sleep(0.1)
    os.write(2, b"-- timer\\n")
    await applog.logged({}, None, sent, ok, "last", "GET", "/last")
    logging.getLogger("x").info("after the last")

asyncio.run(main())
"""
)


def test_request_ids_are_unique_across_forks() -> None:
    """An instance is a fork of its zygote: its request ids (a random part made at each fork, and a
    count) never repeat its parent's or a sibling's."""
    code = (
        "import os; from osless.runtime import applog; ids = [applog.new_request_id()]\n"
        "for _ in range(2):\n"
        "    r, w = os.pipe(); pid = os.fork()\n"
        "    if pid == 0: os.write(w, applog.new_request_id().encode()); os._exit(0)\n"
        "    os.waitpid(pid, 0); ids.append(os.read(r, 64).decode())\n"
        "ids.append(applog.new_request_id()); print(' '.join(ids))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    ids = out.split()
    assert len(ids) == 4 and len(set(ids)) == 4, ids
    assert len({i[:16] for i in ids}) == 3, ids  # the parent's two share their random part


def test_access_lines_leave_together_and_a_logging_record_keeps_their_order() -> None:
    """Under load an instance writes its access lines in batches (one write, one wake of the node, for
    many requests); they wait 20 ms at most, and a `logging` record takes those waiting along first."""
    err = subprocess.run(
        [sys.executable, "-c", _BATCHING], capture_output=True, text=True, timeout=30, check=True
    ).stderr.split("\n")[:-1]  # not splitlines(): the mark starts with \x1e, a line break to it
    assert err[0] == "-- nothing yet above", err
    paths = [json.loads(line[len(MARK) :])["access"]["path"] for line in err if "access" in line]
    assert paths == [*(f"/p{i}" for i in range(20)), "/last"], err
    assert err.index("-- timer") < len(err) - 2
    assert err[-2].startswith(MARK) and "/last" in err[-2], err
    assert json.loads(err[-1][len(MARK) :])["line"] == "after the last", err


def test_a_web_request_leaves_one_access_line_and_its_logging_with_its_request_id(chatty: Platform) -> None:
    r = httpx.get(f"{chatty.gateway}/chatty/hello?secret=1", timeout=30)
    assert r.status_code == 200, r.text
    rid = r.headers["x-osless-request-id"]
    recs = _wait_logs(chatty, ["--request", rid], lambda recs: any(x["stream"] == "access" for x in recs))
    assert {x["request"] for x in recs} == {rid}  # only this request's lines
    (access,) = [x for x in recs if x["stream"] == "access"]
    a = access["access"]
    assert (a["method"], a["path"], a["status"]) == ("GET", "/chatty/hello", 200)
    assert a["duration_ms"] > 0 and isinstance(a["cold"], bool) and "secret" not in access["line"]
    assert access["source"].startswith("chatty-") and access["line"].endswith(("cold", "warm"))
    (logged,) = [x for x in recs if x["stream"] == "log"]
    assert (logged["line"], logged["level"], logged["logger"]) == (
        "serving /chatty/hello",
        "WARNING",
        "chatty",
    )
    # The next request on the same instance is warm.
    r2 = httpx.get(f"{chatty.gateway}/chatty/missing", timeout=30)
    assert r2.status_code == 404
    again = _wait_logs(chatty, ["--request", r2.headers["x-osless-request-id"]], lambda recs: len(recs) >= 2)
    (access2,) = [x for x in again if x["stream"] == "access"]
    assert access2["access"]["status"] == 404
    if access2["source"] == access["source"]:
        assert access2["access"]["cold"] is False


def test_an_invocation_leaves_an_access_line_and_its_logging_info_as_json(chatty: Platform) -> None:
    word = f"w{time.monotonic_ns()}"
    status, body = chatty.invoke("chatty", "note", {"word": word})
    assert status == 200, body
    rid = body["request_id"]
    recs = _wait_logs(chatty, ["--request", rid], lambda recs: any(x["stream"] == "access" for x in recs))
    (access,) = [x for x in recs if x["stream"] == "access"]
    assert access["access"]["method"] == "INVOKE" and access["access"]["path"] == "note"
    assert access["access"]["status"] == 200
    (info,) = [x for x in recs if x["stream"] == "log"]
    assert (info["line"], info["level"], info["request"]) == (f"noted {word}", "INFO", rid)
    # --grep: only lines holding the text, the print and the logging record, of no request of its own.
    grepped = _logs(chatty, "--grep", word)
    assert sorted(x["line"] for x in grepped) == [f"noted {word}", f"printed {word}"]
    # --since: a window that ended before the word was written holds none of it.
    time.sleep(1.5)
    assert _logs(chatty, "--grep", word, "--since", "1s") == []
    assert len(_logs(chatty, "--grep", word, "--since", "10m")) == 2
    # As a person reads it: the request id and level before the line.
    shown = chatty.cli("logs", "chatty", "--request", rid).stdout
    assert f"{rid} INFO noted {word}" in shown


def test_a_bad_filter_is_refused_with_what_to_fix(chatty: Platform) -> None:
    r = chatty.http("GET", "/v1/apps/chatty/logs", params={"request": "../x"})
    assert r.status_code == 422 or r.status_code == 400, r.text
    r = chatty.http("GET", "/v1/apps/chatty/logs", params={"grep": "x" * 300})
    assert r.status_code in (400, 422) and "grep" in r.text
    bad = chatty.cli("logs", "chatty", "--since", "soon", check=False)
    assert bad.returncode != 0 and "--since takes a duration" in bad.stderr


def test_a_crash_is_a_platform_event_in_the_stream(chatty: Platform) -> None:
    status, _ = chatty.invoke("chatty", "crash", {})
    assert status >= 500
    recs = _wait_logs(
        chatty, ["--grep", "exited with code 3"], lambda recs: any(x["stream"] == "osless" for x in recs)
    )
    assert all(x["stream"] == "osless" and x["source"].startswith("chatty-") for x in recs)
    restarted = _wait_logs(chatty, ["--grep", "restarting in"], lambda recs: bool(recs))
    assert restarted[-1]["stream"] == "osless"
    ready = _logs(chatty, "--grep", "instance ready in")
    assert ready and all(x["stream"] == "osless" for x in ready)


def test_an_oom_kill_in_a_living_instance_is_a_platform_event(chatty: Platform) -> None:
    status, body = chatty.invoke("chatty", "hog_child", {})
    assert status == 200 and body["code"] == -9, body
    # Seen at the instance's next health check (every 5 s or so), from its cgroup's memory events.
    recs = _wait_logs(chatty, ["--grep", "OOM killer killed a process"], lambda recs: bool(recs))
    assert recs[-1]["stream"] == "osless" and "limit is 256 MB" in recs[-1]["line"]


def test_piped_logs_are_never_wrapped(chatty: Platform) -> None:
    word = f"long{time.monotonic_ns()}" + "x" * 200
    assert chatty.invoke("chatty", "note", {"word": word})[0] == 200
    env = {k: v for k, v in chatty.env.items() if k != "COLUMNS"}  # rich would take 80 columns

    def shown() -> str | None:
        out = subprocess.run(
            [OSLESS, "logs", "chatty", "--grep", word], env=env, capture_output=True, text=True, timeout=60
        ).stdout
        return out if f"printed {word}" in out else None

    out = chatty.wait_for(shown, timeout=30, what="the long line")
    (line,) = [x for x in out.splitlines() if f"printed {word}" in x]
    assert len(line) > 200 and line.endswith(f"printed {word}")


def test_scaling_up_and_down_are_platform_events(chatty: Platform) -> None:
    def placed() -> list[dict[str, Any]]:
        return [x for x in _logs(chatty, "--grep", "placed on this node") if x["stream"] == "osless"]

    before = len(placed())
    chatty.cli("scale", "chatty", "--min", "2", "--max", "2")
    try:
        chatty.wait_for(lambda: len(placed()) > before, what="a second instance placed")
    finally:
        chatty.cli("scale", "chatty", "--min", "1", "--max", "1")
    down = _wait_logs(chatty, ["--grep", "instance stopping: scaled down"], lambda recs: bool(recs))
    assert down[-1]["stream"] == "osless" and down[-1]["source"].startswith("chatty-")
