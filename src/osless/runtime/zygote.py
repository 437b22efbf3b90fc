"""The zygotes: import once, then fork warm processes on request.

Two roles, two classes over one loop (`_ForkServer`): the node's `RootZygote` (started by the agent as
`python -s -m osless.runtime.zygote --root --control-fd N`) spawns a `ReleaseZygote` per release, in
the app's sandbox; that one imports the app once, forks an instance for each `fork` request, and keeps
the app's config current (`config` messages), forwarded to its instances over one SOCK_SEQPACKET
channel per instance. N is the zygote's end of a SOCK_SEQPACKET socketpair (see `runtime.protocol`).
Single-threaded on purpose: fork() copies only the calling thread, so a zygote with threads could
hand its children locks held by threads that no longer exist.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any, NoReturn

from osless.runtime import applog, forwarder, protocol, sandbox, seccomp, tracing
from osless.runtime.instance import Instance, create_instance, preload, prewarm, serve
from osless.runtime.loader import load_app
from osless.sdk import config as app_config

__all__ = ["ReleaseZygote", "RootZygote", "check_config", "main", "serve_release", "set_parent_death_signal"]

_PR_SET_PDEATHSIG = 1
# How long instances get to stop on SIGTERM before SIGKILL, when the zygote itself is told to stop.
STOP_GRACE_S = 2.0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")


class _ForkServer:
    """The loop both zygotes run, one thing at a time: the agent's messages on the control socket,
    signals through a wakeup pipe, and children reaped and reported. See docs/architecture.md,
    "Zygote control"."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.children: dict[int, Any] = {}  # pid -> the id the agent gave it
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()

    def run(self) -> NoReturn:
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Signals only mark the wakeup pipe; all the work happens in the loop, one thing at a time.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _noop)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wakeup")
        while not self.stopping:
            for key, mask in self.selector.select(forwarder.retry_in()):
                if key.data == "control":
                    self._on_control()
                elif key.data == "wakeup":
                    self._drain_wakeup()
                    self._reap()
                else:
                    self._on_other(key.data, mask)
            forwarder.retry()
        self._shutdown()

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _on_control(self) -> None:
        try:
            msg, fds = protocol.recv(self.control)
        except protocol.ProtocolError as e:
            self._send({"op": "error", "id": None, "error": str(e)})
            return
        except OSError:  # the agent is gone as surely as with an EOF
            msg, fds = None, []
        if msg is None:
            self.stopping = True
            return
        self._handle(msg, fds)

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        _close_all(fds)
        self._send({"op": "error", "id": msg.get("id"), "error": f"unknown op {msg.get('op')!r}"})

    def _on_other(self, data: Any, mask: int) -> None:
        """An event of a file the subclass registered with the selector."""

    def _reaped(self, pid: int) -> None:
        """A child of ours (in `children`) ended; its exit is reported next."""

    def _before_shutdown(self) -> None:
        """Anything to let go of before the children are stopped."""

    def _leave_loop(self, *, close_control: bool) -> None:
        """In a forked child: drop the zygote's loop, its signal plumbing, selector and wakeup pipe."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if close_control:
            self.control.close()

    def _become_instance(self, fds: list[int], env: dict[str, str]) -> None:
        stdout, stderr = fds
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        _close_all([fd for fd in fds if fd > 2])  # an fd already numbered 1 or 2 is now in its place
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the agent's stdin is not the instance's
        os.close(devnull)
        # Line-buffered, so each print reaches the log as it happens rather than when a buffer fills.
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        os.environ.update(env)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if forwarder.reaped(pid):
                continue  # the egress forwarder died (the app may kill it): started again
            if pid not in self.children:
                continue  # an orphan reparented to us (we are pid 1 in a sandbox)
            iid = self.children.pop(pid)
            self._reaped(pid)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            self._send({"op": "exit", "id": iid, "pid": pid, "code": code, "signal": sig})

    def _send(self, msg: dict[str, Any]) -> None:
        # OSError: the agent is gone; the next read sees EOF and the zygote shuts down.
        with contextlib.suppress(OSError):
            protocol.send(self.control, msg)

    def _shutdown(self) -> NoReturn:
        self._before_shutdown()
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM, group=False)
        deadline = time.monotonic() + STOP_GRACE_S
        while self.children and time.monotonic() < deadline:
            self._reap()
            if self.children:
                self.selector.select(timeout=max(0.0, min(0.05, deadline - time.monotonic())))
                self._drain_wakeup()
        # The whole group: also whatever the instance started that did not stop with it.
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL, group=True)
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.pop(pid, None)
        os._exit(0)


class RootZygote(_ForkServer):
    """The node's first interpreter (the runtime imported once): it spawns release zygotes, in a
    sandbox when the request carries one."""

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        if msg.get("op") == "spawn":
            self._spawn(msg, fds)
        else:
            super()._handle(msg, fds)

    def _spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Root zygote: fork a release zygote, in a sandbox when the request carries one."""
        sid, code, deps, entry = msg.get("id"), msg.get("code"), msg.get("deps"), msg.get("entry")
        if len(fds) != 3 or not isinstance(code, str) or not isinstance(entry, str):
            _close_all(fds)
            self._send(
                {"op": "error", "id": sid, "error": "spawn needs code, entry and 3 fds (control, out, err)"}
            )
            return
        config = msg.get("config")
        if config is not None:
            try:
                check_config(config)
            except ValueError as e:
                _close_all(fds)
                self._send({"op": "error", "id": sid, "error": f"bad spawn config: {e}"})
                return
        try:
            spec = sandbox.SandboxSpec.from_json(msg["sandbox"]) if msg.get("sandbox") else None
        except (TypeError, ValueError) as e:
            _close_all(fds)
            self._send({"op": "error", "id": sid, "error": f"bad sandbox spec: {e}"})
            return
        _flush_stdio()
        control_fd, out, err = fds

        def become_release_zygote() -> NoReturn:
            serve_release(socket.socket(fileno=control_fd), code, deps, entry, config)

        def detach() -> None:
            """In the new process: leave the root's loop, write to the release's log."""
            os.setsid()
            self._leave_loop(close_control=True)
            self._become_instance([out, err], {})

        try:
            if spec is None:
                pid = os.fork()
                if pid == 0:
                    try:
                        set_parent_death_signal(signal.SIGKILL)
                        detach()
                        become_release_zygote()
                    finally:
                        os._exit(1)
            else:
                pid = sandbox.spawn(spec, become_release_zygote, before=detach)
        except OSError as e:
            _close_all(fds)
            self._send({"op": "error", "id": sid, "error": f"spawn failed: {e}"})
            return
        _close_all(fds)
        self.children[pid] = sid
        self._send({"op": "spawned", "id": sid, "pid": pid})


class ReleaseZygote(_ForkServer):
    """One release's fork server: the app imported once (`instance`), it forks instances and keeps
    their config current, over one SEQPACKET channel per instance."""

    def __init__(self, control: socket.socket, instance: Instance) -> None:
        super().__init__(control)
        self.instance = instance
        # pid -> the zygote's end of the instance's config channel, and the pids whose channel was full
        # at the last change: they get the latest values once it drains.
        self.channels: dict[int, socket.socket] = {}
        self.behind: set[int] = set()
        self.last_config = b""  # the last `config` message, encoded once for every instance

    def _handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        if msg.get("op") == "fork":
            self._fork(msg, fds)
        elif msg.get("op") == "config":
            _close_all(fds)
            self._configure(msg)
        else:
            super()._handle(msg, fds)

    def _reaped(self, pid: int) -> None:
        self._drop_channel(pid)

    def _before_shutdown(self) -> None:
        for pid in list(self.channels):  # a writable or closing channel would make the waits below spin
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.channels[pid])
        self.behind.clear()

    def _leave_loop(self, *, close_control: bool) -> None:
        # The other instances' channels are the zygote's to write, not this child's.
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        self.behind.clear()
        super()._leave_loop(close_control=close_control)

    def _fork(self, msg: dict[str, Any], fds: list[int]) -> None:
        iid, env = msg.get("id"), msg.get("env", {})
        problem = None
        if len(fds) < 4:
            problem = (
                "fork needs at least 4 fds (stdout, stderr, the web and control sockets, then "
                f"cgroup.procs files), got {len(fds)}"
            )
        elif not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            problem = "fork env must map names to strings"
        if problem is not None:
            _close_all(fds)
            self._send({"op": "error", "id": iid, "error": problem})
            return
        assert isinstance(env, dict)
        # With `spans` and `access`, the fds after the two sockets are the pipes the instance writes
        # its spans and its access lines to, in that order.
        spans_fd = fds.pop(4) if msg.get("spans") is True and len(fds) > 4 else -1
        access_fd = fds.pop(4) if msg.get("access") is True and len(fds) > 4 else -1
        pipes = [fd for fd in (spans_fd, access_fd) if fd >= 0]
        # Anything still buffered would otherwise be written twice, once by each process.
        _flush_stdio()
        zygote_pid = os.getpid()
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            _close_all([*fds, *pipes])
            self._send({"op": "error", "id": iid, "error": f"fork failed: {e}"})
            return
        # The child waits on this pipe before reporting ready, so `forked` always reaches the agent first.
        try:
            order_r, order_w = os.pipe()
        except OSError as e:  # out of descriptors: an error to the agent, not the zygote's end
            _close_all([*fds, *pipes])
            ours.close()
            theirs.close()
            self._send({"op": "error", "id": iid, "error": f"fork failed: {e}"})
            return
        try:
            pid = os.fork()
        except OSError as e:
            _close_all([*fds, order_r, order_w, *pipes])
            ours.close()
            theirs.close()
            self._send({"op": "error", "id": iid, "error": f"fork failed: {e}"})
            return
        if pid == 0:
            os.close(order_w)
            ours.close()
            self._child(zygote_pid, iid, env, fds, order_r, theirs, spans_fd, access_fd)
        os.close(order_r)
        _close_all([*fds, *pipes])
        theirs.close()
        ours.setblocking(False)  # a stuck instance must never stall the zygote
        self.children[pid] = iid
        self.channels[pid] = ours
        # Read too: the instance asks for its replacement on it (`recycle`), and the zygote, which
        # knows whose channel it is, tells the agent; the instance itself holds no channel to it.
        self.selector.register(ours, selectors.EVENT_READ, pid)
        self._send({"op": "forked", "id": iid, "pid": pid})
        os.close(order_w)

    def _configure(self, msg: dict[str, Any]) -> None:
        """Release zygote: keep the new values (later forks inherit them) and pass them to each instance."""
        try:
            values, version = check_config(msg)
        except ValueError as e:
            self._send({"op": "error", "id": msg.get("id"), "error": str(e)})
            return
        # Encoded once, as protocol.send would, rather than once per instance: it is the same packet.
        data = json.dumps(
            {"op": "config", "values": values, "version": version}, separators=(",", ":")
        ).encode()
        if len(data) > protocol.MAX_PACKET:
            error = f"config of {len(data)} bytes exceeds the {protocol.MAX_PACKET}-byte packet limit"
            self._send({"op": "error", "id": msg.get("id"), "error": error})
            return
        app_config.apply(values, version)
        self.last_config = data
        delivered = 0
        for pid in list(self.channels):
            delivered += self._push(pid)
        self._send({"op": "configured", "version": version, "instances": delivered})

    def _push(self, pid: int) -> int:
        """Send the latest config to one instance: 1 if it went, 0 if it waits or the channel is gone."""
        channel = self.channels[pid]
        try:
            channel.send(self.last_config)  # one packet, all or nothing
        except BlockingIOError:
            # Its queue is full (an instance whose loop is busy): each message carries every value, so
            # sending only the latest once it drains loses nothing.
            if pid not in self.behind:
                self.behind.add(pid)
                self.selector.modify(channel, selectors.EVENT_READ | selectors.EVENT_WRITE, pid)
            return 0
        except OSError as e:  # the instance is gone or going; its exit is reported when it is reaped
            print(
                f"instance {self.children.get(pid)!r} (pid {pid}) left the config channel: {e}",
                file=sys.stderr,
            )
            self._drop_channel(pid)
            return 0
        if pid in self.behind:
            self.behind.discard(pid)
            self.selector.modify(channel, selectors.EVENT_READ, pid)
        return 1

    def _on_other(self, pid: int, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and pid in self.channels:
            self._push(pid)
        if mask & selectors.EVENT_READ and pid in self.channels:
            self._from_instance(pid)

    def _from_instance(self, pid: int) -> None:
        """What an instance says on its channel: only `recycle`, sent on as coming from this pid's
        instance (whatever id the message names: the channel says whose it is)."""
        try:
            msg, fds = protocol.recv(self.channels[pid])
        except BlockingIOError:
            return
        except (OSError, protocol.ProtocolError):
            msg, fds = None, []
        _close_all(fds)
        if msg is None:  # the instance is ending; its exit is reported when it is reaped
            self._drop_channel(pid)
        elif msg.get("op") == "recycle" and pid in self.children:
            reason = str(msg.get("reason") or "asked by the instance")[:500]
            self._send({"op": "recycle", "id": self.children[pid], "reason": reason})

    def _drop_channel(self, pid: int) -> None:
        channel = self.channels.pop(pid, None)
        if channel is None:
            return
        self.behind.discard(pid)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(channel)
        channel.close()

    def _child(
        self,
        zygote_pid: int,
        iid: Any,
        env: dict[str, str],
        fds: list[int],
        order_r: int,
        channel: socket.socket,
        spans_fd: int = -1,
        access_fd: int = -1,
    ) -> NoReturn:
        code = 1
        try:
            os.setsid()  # its own session and process group: the agent's terminal signals stay there
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != zygote_pid:
                os._exit(1)  # the zygote died before prctl took effect
            self._join_cgroups(fds[4:])
            self._leave_loop(close_control=False)
            web, control = (socket.socket(fileno=fd) for fd in fds[2:4])
            self._become_instance(fds[:2], env)
            if spans_fd >= 0:
                os.set_inheritable(spans_fd, False)  # the instance's alone, not its subprocesses'
                os.environ[tracing.SPANS_FD_ENV] = str(spans_fd)
            if access_fd >= 0:
                os.set_inheritable(access_fd, False)
                applog.use_access_fd(access_fd)
            self.instance.recycle = functools.partial(_ask_recycle, channel)
            code = serve(
                self.instance, web, control, lambda: self._report_ready(iid, order_r), config_channel=channel
            )
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            _flush_stdio()
            os._exit(code)  # never return into the zygote's loop

    @staticmethod
    def _join_cgroups(fds: list[int]) -> None:
        """Join the instance's cgroups through files the agent opened, before any app code runs.

        "0" means the writer itself; on cgroup v1 the files are `tasks`, where a thread moving
        itself skips the kernel's global lock (see `node.cgroups`). Still single-threaded here.
        """
        for fd in fds:
            os.write(fd, b"0")
            os.close(fd)

    def _report_ready(self, iid: Any, order_r: int) -> None:
        os.read(order_r, 1)  # returns at EOF, once the zygote has sent `forked`
        os.close(order_r)
        protocol.send(self.control, {"op": "ready", "id": iid})
        # The instance has no further use for the control channel (it asks for its replacement on
        # its own channel to the zygote); dropping it means the agent sees EOF as soon as the zygote
        # is gone, and app code never holds a way to speak to the agent as the zygote.
        self.control.close()


def _ask_recycle(channel: socket.socket, reason: str) -> None:
    """From the instance: ask its zygote (and through it the agent) for a fresh instance in its place."""
    with contextlib.suppress(OSError, protocol.ProtocolError):
        protocol.send(channel, {"op": "recycle", "reason": reason[:500]})


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or None when started without them
            stream.flush()


def _noop(signum: int, frame: Any) -> None:
    pass


def _kill(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_config(obj: object) -> tuple[dict[str, Any], int]:
    """(values, version) of a `{"values": {...}, "version": N}` object; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f'config must be {{"values": {{...}}, "version": N}}, got {type(obj).__name__}')
    values, version = obj.get("values"), obj.get("version")
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ValueError("config values must be an object of key names to values")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError("config version must be an integer >= 0")
    return values, version


def serve_release(
    control: socket.socket, code: str, deps: str | None, entry: str, config: object = None
) -> NoReturn:
    """Apply the initial config, import the app once, say `ready` (or `failed`), then fork instances."""
    try:
        if config is not None:
            # Before the import, so that module-level reads of the settings see the values.
            app_config.apply(*check_config(config))
        applog.install_logging()  # before the import: the app's loggers are made under it
        instance = create_instance(load_app(code, deps, entry))
        prewarm(instance)
    except BaseException:
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        # A deep traceback may not fit one packet; its end (the error itself) matters most.
        for keep in (len(error), 16_000, 4_000):
            try:
                protocol.send(control, {"op": "failed", "error": error[-keep:]})
                break
            except protocol.ProtocolError:
                continue
            except OSError:
                break
        os._exit(1)
    # Objects that exist now are never collected: a collection would touch (and so copy) every
    # page of the zygote's heap in each forked instance.
    gc.collect()
    gc.freeze()
    protocol.send(control, {"op": "ready", "pid": os.getpid()})
    ReleaseZygote(control, instance).run()


def main(argv: list[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -s -m osless.runtime.zygote", description=__doc__)
    parser.add_argument("--root", action="store_true", help="a root zygote: spawn release zygotes on request")
    parser.add_argument("--code", help="the code layer (the app's source)")
    parser.add_argument("--deps", help="the dependency layer")
    parser.add_argument("--entry", help="module defining the App")
    parser.add_argument("--control-fd", type=int, required=True, help="our end of the SEQPACKET socketpair")
    parser.add_argument(
        "--config",
        help='initial config, {"values": {...}, "version": N}; any user can read a command line, so the '
        "agent sends secrets in its spawn request instead",
    )
    args = parser.parse_args(argv)
    if not args.root and not (args.code and args.entry):
        parser.error("--code and --entry are required unless --root is given")
    try:
        config = json.loads(args.config) if args.config is not None else None
    except ValueError as e:
        parser.error(f"--config is not JSON: {e}")

    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)  # the agent died before prctl took effect: nobody would ever stop us
    control = socket.socket(fileno=args.control_fd)
    if args.root:
        seccomp.unavailable_reason()  # loads libseccomp now, so no sandbox pays for it
        preload()  # before any app's layers are on the path: the runtime's own server modules
        gc.collect()
        gc.freeze()
        protocol.send(control, {"op": "ready", "pid": os.getpid()})
        RootZygote(control).run()
    serve_release(control, args.code, args.deps, args.entry, config)


if __name__ == "__main__":
    main()
