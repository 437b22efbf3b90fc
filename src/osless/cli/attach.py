"""`osless debug attach APP`: a local port that is debugpy in a running instance, through the API
(`WS /v1/apps/{app}/debug/attach`), for VS Code's or PyCharm's "attach"; and `osless debug shell APP`,
a Python REPL with the app imported in a fresh sandbox of its release (`osless run`'s path)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from osless.cli.credentials import api_and_token
from osless.cli.output import JsonOpt, console, err_console, fail, parse_duration

__all__ = ["attach", "shell"]

CHUNK = 64 * 1024  # the API's frame cap
ACCEPT_WAIT_S = 600.0  # for the debugger's client to connect to the local port


def attach(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    instance: Annotated[
        str | None, typer.Option("--instance", help="One instance (`osless instances APP`); else the first.")
    ] = None,
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="The local port to attach to (0: a free one).")
    ] = 5678,
    keep_in_rotation: Annotated[
        bool,
        typer.Option("--keep-in-rotation", help="Let the gateway send the instance traffic while attached."),
    ] = False,
    timeout: Annotated[
        str, typer.Option("--timeout", help="End the session after this long (at most 4h).")
    ] = "30m",
    json_out: JsonOpt = False,
) -> None:
    """Attach a debugger (debugpy) to a running instance: VS Code's or PyCharm's "attach" to
    127.0.0.1:PORT then stops at your breakpoints. The instance leaves the rotation meanwhile
    (unless --keep-in-rotation) and is replaced by a fresh one after. Needs `debug`; audited."""
    seconds = parse_duration(timeout, "--timeout")
    if seconds > 4 * 3600:
        fail("--timeout is at most 4h")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
    except OSError as e:
        fail(f"cannot listen on 127.0.0.1:{port} ({e.strerror}): choose another with --port", "port_taken")
    port = listener.getsockname()[1]
    api, token = api_and_token()
    from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI
    from websockets.sync.client import connect

    from osless.cli.oneoff import _refusal, _ssl

    params = {"timeout": f"{seconds:g}", "rotation": "keep" if keep_in_rotation else "leave"}
    if instance:
        params["instance"] = instance
    url = (
        "ws" + api.rstrip("/").removeprefix("http") + f"/v1/apps/{app_name}/debug/attach?" + urlencode(params)
    )
    try:
        ws = connect(
            url,
            additional_headers={"authorization": f"Bearer {token}", "user-agent": "osless-cli"},
            max_size=CHUNK,
            open_timeout=30,
            ssl=_ssl() if url.startswith("wss:") else None,
        )
    except InvalidStatus as e:
        code, message = _refusal(e.response.status_code, bytes(e.response.body or b""))
        fail(message, code)
    except (OSError, TimeoutError, InvalidURI) as e:
        fail(f"cannot reach the API at {api} ({e}); is `osless up` running?", "unreachable")
    with ws, listener:
        try:
            first = json.loads(ws.recv(timeout=30))
        except (ConnectionClosed, TimeoutError, ValueError, TypeError):
            first = None
        if not isinstance(first, dict) or first.get("op") != "attached":
            why = first.get("reason") if isinstance(first, dict) else ws.close_reason
            fail(f"the debug session did not start: {why or 'the API closed it'}", "attach_failed")
        where = {
            "instance": first.get("instance"),
            "node": first.get("node"),
            "host": "127.0.0.1",
            "port": port,
        }
        if json_out:
            sys.stdout.write(json.dumps(where) + "\n")
            sys.stdout.flush()
        else:
            until = time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))
            console.print(
                f"debugpy in instance {where['instance']} (node {where['node']}): attach your debugger to "
                f"127.0.0.1:{port} (until {until}; Ctrl-C ends it)",
                markup=False,
            )
        conn, early, reason = _accept(ws, listener)
        if conn is not None:
            with conn:
                for data in early:
                    conn.sendall(data)
                reason = _relay(ws, conn)
    if json_out:
        sys.stdout.write(json.dumps({"ended": reason}) + "\n")
    else:
        console.print(f"debug session ended: {reason}", markup=False)


def _accept(ws: Any, listener: socket.socket) -> tuple[socket.socket | None, list[bytes], str]:
    """The debugger's connection to the local port, what debugpy sent meanwhile, and, if the session
    ended first (its timeout, the API gone) or none came in time, why."""
    from websockets.exceptions import ConnectionClosed

    early: list[bytes] = []
    listener.settimeout(0.5)
    deadline = time.monotonic() + ACCEPT_WAIT_S
    try:
        while time.monotonic() < deadline:
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                pass
            else:
                uid = _peer_uid(peer, listener.getsockname()[1])
                if uid in (os.getuid(), None):
                    return conn, early, ""
                # debugpy runs any code it is sent, as the app: only this user's debugger may have it.
                conn.close()
                err_console.print(
                    f"refused a connection from uid {uid} (another user): the session waits for yours",
                    markup=False,
                )
            try:
                while True:
                    frame = ws.recv(timeout=0)
                    if isinstance(frame, bytes):
                        early.append(frame)
                    elif _ended(frame) is not None:
                        return None, early, str(_ended(frame))
            except TimeoutError:
                continue
            except ConnectionClosed:
                return None, early, ws.close_reason or "the API closed the connection"
    except KeyboardInterrupt:
        return None, early, "interrupted"
    return None, early, f"no debugger connected within {ACCEPT_WAIT_S:.0f}s"


def _peer_uid(peer: tuple[str, int], port: int) -> int | None:
    """The uid that owns the client end of a connection to our 127.0.0.1:`port` (from the kernel's
    socket table, /proc/net/tcp); -1 if not found there; None where there is no such table (not
    Linux), where any local user could be the one connecting."""

    def address(ip: str, at: int) -> str:  # as the kernel prints it: the address's u32 in host order
        return f"{int.from_bytes(socket.inet_aton(ip), sys.byteorder):08X}:{at:04X}"

    want = (address(peer[0], peer[1]), address("127.0.0.1", port))
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        if len(fields) > 7 and (fields[1], fields[2]) == want:
            return int(fields[7])
    return -1


def _ended(text: str) -> str | None:
    """The reason of an `end` message; None for anything else."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        said = json.loads(text)
        if said.get("op") == "end":
            return str(said.get("reason") or "ended")[:300]
    return None


def _relay(ws: Any, conn: socket.socket) -> str:
    """The local connection's bytes to the API and back, until one side ends; why it ended."""
    from websockets.exceptions import ConnectionClosed

    def up() -> None:
        with contextlib.suppress(OSError, ConnectionClosed):
            while data := conn.recv(CHUNK):
                ws.send(data)
        with contextlib.suppress(Exception):
            ws.close()

    threading.Thread(target=up, daemon=True).start()
    try:
        while True:
            try:
                frame = ws.recv()
            except ConnectionClosed:
                return ws.close_reason or "the API closed the connection"
            if isinstance(frame, bytes):
                try:
                    conn.sendall(frame)
                except OSError:
                    return "the debugger disconnected"
            elif (reason := _ended(frame)) is not None:
                return reason
    except KeyboardInterrupt:
        return "interrupted"
    finally:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


# Run by `python -i -c` in the sandbox, whose working folder is the code layer: the app's entry
# module imported as the instances import it, its names in the REPL's globals.
SHELL_BOOT = (
    "import os, sys, importlib; from osless.runtime.loader import find_entry; "
    "_m = importlib.import_module(find_entry(os.getcwd())); "
    "globals().update({k: v for k, v in vars(_m).items() if not k.startswith('__')}); "
    "print(f'osless shell: {_m.__name__} imported; its names are here (app, ...)', file=sys.stderr); "
    "del _m"
)


def shell(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    timeout: Annotated[str, typer.Option("--timeout", help="End the shell after this long.")] = "1h",
) -> None:
    """A Python REPL in a fresh sandbox of the app's current release, with the app imported: its
    code, dependencies, config, secrets, volumes and egress, as `modal shell`. `osless run`'s path:
    needs `deploy` (a shell is a command), audited as a run."""
    from osless.cli.oneoff import run

    run(app_name, ["python", "-i", "-c", SHELL_BOOT], release=None, timeout=timeout, json_out=False)
