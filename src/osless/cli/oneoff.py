"""`osless run APP -- CMD ARGS...`: a one-off command in a fresh sandbox of the app's release.

Over the API's websocket (`WS /v1/apps/{app}/runs`, frames in `runwire`): stdout and stderr are
written as they come, stdin is sent as it is read. At a terminal (the CLI's stdin is one, and no
--json), the command gets a terminal of its own of the same size (a pty, as `docker run -it`), the
local one is raw meanwhile (keys, Ctrl-C included, go to the command), and its size follows the
local one's; otherwise pipes, and Ctrl-C ends the command. The CLI exits with the command's code.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from osless import runwire
from osless.cli.credentials import api_and_token
from osless.cli.output import JsonOpt, fail, parse_duration

__all__ = ["run"]

JSON_CAPTURE = 1024 * 1024  # bytes of each stream kept for --json; the rest is counted, not kept
STOP_WAIT_S = 5.0  # after Ctrl-C, for the command's end to be said


def run(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    command: Annotated[list[str] | None, typer.Argument(metavar="-- CMD [ARGS]...")] = None,
    release: Annotated[
        int | None, typer.Option("--release", min=1, help="A release other than the current one.")
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option("--timeout", help="End the command after this long (default 1h), e.g. 90s, 15m."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a command in a fresh sandbox of the app's release: its code, dependencies, config, secrets,
    volumes and limits. Exits with the command's exit code."""
    if not command:
        fail(
            "give the command after --, for example: osless run shop -- python manage.py migrate",
            "invalid_usage",
        )
    problem = runwire.command_problem(command)
    if problem:
        fail(problem, "invalid_usage")
    params: dict[str, str] = {}
    if release is not None:
        params["release"] = str(release)
    if timeout is not None:
        params["timeout"] = f"{parse_duration(timeout, '--timeout'):g}"
    api, token = api_and_token()
    from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    url = "ws" + api.rstrip("/").removeprefix("http") + f"/v1/apps/{app_name}/runs"
    if params:
        url += "?" + urlencode(params)
    try:
        ws = connect(
            url,
            additional_headers={"authorization": f"Bearer {token}", "user-agent": "osless-cli"},
            max_size=runwire.MAX_FRAME,
            open_timeout=15,
            ssl=_ssl() if url.startswith("wss:") else None,
        )
    except InvalidStatus as e:
        code, message = _refusal(e.response.status_code, bytes(e.response.body or b""))
        fail(message, code)
    except (OSError, TimeoutError, InvalidURI) as e:
        fail(f"cannot reach the API at {api} ({e}); is `osless up` running?", "unreachable")
    captured: dict[int, bytearray] = {runwire.STDOUT: bytearray(), runwire.STDERR: bytearray()}
    sizes = {runwire.STDOUT: 0, runwire.STDERR: 0}
    end: dict[str, Any] | None = None
    terminal = None if json_out else _terminal_size()
    with ws, _raw(ws, terminal is not None):
        ws.send(json.dumps({"op": "start", "command": command, "tty": terminal}))
        threading.Thread(target=_pump_stdin, args=(ws,), daemon=True).start()
        try:
            end = _read(ws, captured, sizes, json_out)
        except KeyboardInterrupt:
            try:
                ws.send(json.dumps({"op": "stop"}))
                end = _read(ws, captured, sizes, json_out, timeout=STOP_WAIT_S)
            except (ConnectionClosed, TimeoutError, KeyboardInterrupt):
                end = None
            end = {"op": "exit", "code": 130} if end is None or end.get("op") != "exit" else end
    if end is None:
        fail("the API closed the connection before the command ended", "connection_lost")
    if end.get("op") == "error":
        fail(str(end.get("message") or "the command did not run"), str(end.get("code") or "failed"))
    exit_code = int(end.get("code", 1))
    if json_out:
        out = {
            "exit_code": exit_code,
            "stdout": captured[runwire.STDOUT].decode("utf-8", "replace"),
            "stderr": captured[runwire.STDERR].decode("utf-8", "replace"),
            "truncated": any(n > JSON_CAPTURE for n in sizes.values()),
        }
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    raise typer.Exit(exit_code)


def _read(
    ws: Any,
    captured: dict[int, bytearray],
    sizes: dict[int, int],
    json_out: bool,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Frames until the last one (`exit` or `error`); None if the connection closed first."""
    from websockets.exceptions import ConnectionClosed

    streams = {runwire.STDOUT: sys.stdout.buffer, runwire.STDERR: sys.stderr.buffer}
    try:
        while True:
            msg = ws.recv(timeout=timeout)
            if isinstance(msg, bytes):
                tag, data = (msg[0], msg[1:]) if msg else (-1, b"")
                if tag not in streams:
                    continue
                if json_out:
                    keep = max(0, JSON_CAPTURE - sizes[tag])
                    captured[tag] += data[:keep]
                    sizes[tag] += len(data)
                else:
                    streams[tag].write(data)
                    streams[tag].flush()
                continue
            try:
                last = json.loads(msg)
            except ValueError:
                continue
            if isinstance(last, dict) and last.get("op") in ("exit", "error"):
                return last
    except ConnectionClosed:
        return None


def _pump_stdin(ws: Any) -> None:
    """Stdin to the command as it is read; its end as `eof`."""
    from websockets.exceptions import ConnectionClosed

    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    try:
        while fd >= 0:
            data = os.read(fd, runwire.MAX_CHUNK)
            if not data:
                break
            ws.send(bytes([runwire.STDIN]) + data)
        ws.send(json.dumps({"op": "eof"}))
    except (ConnectionClosed, OSError):
        return


def _terminal_size() -> dict[str, int] | None:
    """The local terminal's size, when stdin is one: the command then gets a terminal too."""
    try:
        if not os.isatty(0):
            return None
        cols, rows = os.get_terminal_size(0)
    except OSError:
        return None
    return {"rows": rows or 24, "cols": cols or 80}


@contextlib.contextmanager
def _raw(ws: Any, on: bool) -> Iterator[None]:
    """The local terminal raw while the command has one (its keys, Ctrl-C too, are the command's),
    its size sent along when it changes; as it was, after."""
    if not on:
        yield
        return
    import signal
    import termios
    import tty

    def send_size() -> None:
        size = _terminal_size()
        with contextlib.suppress(Exception):
            if size:
                ws.send(json.dumps({"op": "resize", **size}))

    def resized(signum: int, frame: object) -> None:
        # From a thread: the handler may run while this one is inside the connection's lock.
        threading.Thread(target=send_size, daemon=True).start()

    before = termios.tcgetattr(0)
    previous = signal.signal(signal.SIGWINCH, resized)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, before)
        signal.signal(signal.SIGWINCH, previous)


def _refusal(status: int, body: bytes | None) -> tuple[str, str]:
    try:
        error = json.loads(body or b"")["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        if status in (401, 403):  # the guard closes a websocket it does not authenticate
            return "unauthorized", f"the API refused the token (HTTP {status}): check OSLESS_TOKEN"
        return "failed", f"the API answered HTTP {status}"


def _ssl() -> Any:
    import ssl

    import certifi

    return ssl.create_default_context(
        cafile=os.environ.get("SSL_CERT_FILE")
        or (None if os.environ.get("SSL_CERT_DIR") else certifi.where()),
        capath=os.environ.get("SSL_CERT_DIR") or None,
    )
