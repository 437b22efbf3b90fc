"""What coldstart.py and density.py share: the hello image, the real spawn path, raw HTTP, memory figures.

Everything here drives the platform's own parts (Builder, RootZygote, Zygote, sandbox_spec, Cgroups),
as the node agent does; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osless.builder import Builder, pack
from osless.contracts import ImageManifest
from osless.images import ImageStore
from osless.images.runtime import runtime_layer
from osless.logs import LogWriter
from osless.node.cgroups import Cgroups, InstanceCgroup, Limits
from osless.node.isolation import sandbox_spec
from osless.node.spawn import Child, RootZygote, Zygote

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "examples" / "hello"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
EXPECTED_BODY = b"Hello from osless!"
POLL_S = 0.0001  # between connect attempts while a server is not yet listening


# -- work dir and image ------------------------------------------------------------------------------


def make_workdir() -> Path:
    # Short on purpose: unix socket paths below it must stay under 108 bytes.
    return Path(tempfile.mkdtemp(prefix="oslbench-", dir="/tmp"))


def remove_workdir(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)


@dataclass
class Image:
    digest: str
    manifest: ImageManifest
    layers: Path

    @property
    def code(self) -> Path:
        return self.layers / self.manifest.layers.code

    @property
    def deps(self) -> Path:
        return self.layers / self.manifest.layers.deps


def build_hello(work: Path) -> Image:
    lines: list[str] = []
    store = ImageStore(work / "images")
    try:
        result = Builder(store).build(pack(HELLO), log=lines.append)
    except Exception:
        print("\n".join(lines), file=sys.stderr)
        raise
    return Image(result.image, result.manifest, store.layers_dir)


def host() -> dict[str, Any]:
    """Context for the figures: this machine's CPUs and how busy it was (other work skews timings)."""
    return {"cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2), "kernel": os.uname().release}


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the platform: root zygote, the release's sandboxed zygote, cgroups --------------------------------


# The host uid the benchmarks' sandboxes run as (on the platform, the API allocates one per app).
BENCH_UID = 199_999


def _sockets_dir(run_dir: Path) -> Path:
    path = run_dir / "sockets"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def bind_sockets(web: Path) -> tuple[socket.socket, socket.socket]:
    """An instance's web socket at `web` and its control socket beside it, bound as the agent does."""
    pair = []
    for path in (web, web.with_suffix(".ctl")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        pair.append(sock)
    return pair[0], pair[1]


@dataclass
class Instance:
    iid: str
    sock: Path
    child: Child
    cgroup: InstanceCgroup | None  # None only in the diagnostic runs without resource limits


@dataclass
class Platform:
    work: Path
    image: Image
    run_dir: Path
    sock_dir: Path
    cgroups: Cgroups
    root: RootZygote
    zygote: Zygote
    instance_log: LogWriter
    writers: list[LogWriter]
    groups: list[InstanceCgroup] = field(default_factory=list)  # every group we made, for the final check
    pids: set[int] = field(default_factory=set)  # every host pid we saw, for the final check

    @classmethod
    async def start(cls, work: Path, image: Image) -> Platform:
        found = Cgroups.detect(scope=f"bench-{os.getpid()}")
        if not isinstance(found, Cgroups):
            raise SystemExit(f"cgroups unavailable: {found}")
        run_dir = work / "run"
        logs = work / "logs"
        writers = [
            LogWriter(logs / "root-zygote.log", source="root-zygote"),
            LogWriter(logs / "zygote.log", source="zygote"),
            LogWriter(logs / "instances.log", source="instance"),
        ]
        runtime = runtime_layer(work / "runtime")
        root = RootZygote(writers[0], runtime)
        await root.start()
        spec = sandbox_spec(
            image.manifest,
            uid=BENCH_UID,
            layers=[image.code, image.deps],
            runtime=runtime.path,
            data_dir=work,
            run_dir=run_dir,
            volumes={},  # the benchmarks' apps declare none
            egress_socket=None,
        ).to_json()
        zygote = Zygote(
            image=image.digest,
            app=image.manifest.app,
            uid=BENCH_UID,
            code_dir=image.code,
            deps_dir=image.deps,
            entry=image.manifest.entry,
            log=writers[1],
            sandbox=spec,
        )
        try:
            await zygote.start(root)
        except BaseException:
            await root.stop()
            raise
        platform = cls(
            work=work,
            image=image,
            run_dir=run_dir,
            sock_dir=_sockets_dir(run_dir),
            cgroups=found,
            root=root,
            zygote=zygote,
            instance_log=writers[2],
            writers=writers,
        )
        platform.pids.update(p for p in (root.proc.pid if root.proc else 0, zygote.pid) if p)
        zpid = platform.release_zygote_pid()
        if zpid:
            platform.pids.add(zpid)
        return platform

    def release_zygote_pid(self) -> int | None:
        """`Zygote.pid` is the keeper outside the sandbox; the zygote proper is its child (pid 1 inside)."""
        try:
            kids = Path(f"/proc/{self.zygote.pid}/task/{self.zygote.pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def new_cgroup(self) -> InstanceCgroup:
        group = self.cgroups.create(Limits())
        self.groups.append(group)
        return group

    async def fork(self, iid: str, group: InstanceCgroup | None = None, *, cgroup: bool = True) -> Instance:
        """Fork one instance (it is not necessarily ready when this returns: await `.child.ready`)."""
        if cgroup and group is None:
            group = self.new_cgroup()
        sock = self.sock_dir / f"{iid}.sock"
        sockets = bind_sockets(sock)
        fds = group.open_join_files() if group is not None else []
        try:
            child = await self.zygote.fork(iid, sockets, {}, self.instance_log, fds)
        finally:
            for fd in fds:
                os.close(fd)
            for s in sockets:
                s.close()
        return Instance(iid, sock, child, group)

    async def kill(self, instances: list[Instance], timeout: float = 10.0) -> None:
        """SIGKILL through the cgroups, wait for the zygote's exit reports, remove the groups."""
        for inst in instances:
            targets = inst.cgroup.pids() if inst.cgroup is not None else []
            if inst.child.pid_is_real:
                self.pids.add(inst.child.pid)
                targets.append(inst.child.pid)
            for pid in targets:
                self.pids.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(i.child.exited for i in instances), return_exceptions=True), timeout
            )
        for inst in instances:
            if inst.cgroup is not None:
                inst.cgroup.kill_all()
                inst.cgroup.remove()
            with contextlib.suppress(OSError):
                inst.sock.unlink()

    async def stop(self) -> None:
        await self.zygote.stop()
        await self.root.stop()
        for w in self.writers:
            w.close()

    def leftover_cgroups(self) -> list[str]:
        # Removal may lag a moment behind the last task's exit on cgroup v1: retry briefly.
        deadline = time.monotonic() + 3.0
        while True:
            left = [d for g in self.groups for d in g.dirs if d.exists()]
            if not left or time.monotonic() > deadline:
                self.cgroups.close()  # the pool, and this run's own scope folders
                return [str(d) for d in left]
            for g in self.groups:
                g.kill_all(timeout=0.2)
                g.remove()
            time.sleep(0.05)

    def log_tail(self, n: int = 20) -> str:
        out = []
        for w in self.writers:
            with contextlib.suppress(OSError):
                out += w.path.read_text(errors="replace").splitlines()[-n:]
        return "\n".join(out)


def osless_agents() -> set[int]:
    """Pids of `osless up` processes on this host (other agents: their start-up cgroup sweep reaches ours)."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"up" in argv and any(a.endswith(b"osless") for a in argv):
            found.add(int(d.name))
    return found


def exit_statuses(instances: list[Instance]) -> dict[str, int]:
    """How the instances that already ended ended, e.g. {"signal 9": 3}."""
    out: dict[str, int] = {}
    for inst in instances:
        if inst.child.exited.done():
            st = inst.child.exited.result()
            key = f"signal {st.signal}" if st.signal is not None else f"code {st.code}"
            out[key] = out.get(key, 0) + 1
    return out


def alive(pids: set[int] | list[int]) -> list[int]:
    """Those of `pids` that still exist and are not zombies."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return sorted(out)


async def wait_gone(pids: set[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := alive(pids)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return left


# -- raw HTTP over a unix socket -------------------------------------------------------------------------


@dataclass
class Reply:
    first_byte: float  # perf_counter() when the first byte of the reply arrived
    status: int
    body: bytes


def _read_reply(s: socket.socket, first: bytes) -> tuple[int, bytes]:
    buf = bytearray(first)
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed mid-headers: {bytes(buf)[:200]!r}")
        buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body


def get_first_byte(
    path: str | Path, timeout: float = 30.0, retry: bool = True, cancel: threading.Event | None = None
) -> Reply:
    """Connect (retrying until the socket exists and listens), send GET /, time the reply's first byte."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if not retry or time.monotonic() > deadline or (cancel is not None and cancel.is_set()):
                raise
            time.sleep(POLL_S)
            continue
        try:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.sendall(REQUEST)
            first = s.recv(1)
            t = time.perf_counter()
            if not first:
                raise ConnectionError("connection closed before any reply")
            status, body = _read_reply(s, first)
            return Reply(t, status, body)
        finally:
            s.close()


def answers(path: str | Path, timeout: float = 5.0, retry: bool = False) -> bool:
    """Whether GET / on `path` gets hello's 200 reply; with `retry`, wait for the socket to accept first."""
    try:
        reply = get_first_byte(path, timeout=timeout, retry=retry)
    except OSError:
        return False
    return reply.status == 200 and EXPECTED_BODY in reply.body


# -- the baselines: a fresh interpreter, optionally in bubblewrap ------------------------------------------


def fresh_script(image: Image, sock: Path) -> str:
    """The app served the plain way: layers on sys.path, import it, call its web factory, uvicorn."""
    return (
        f"import sys; sys.path[:0] = [{str(image.code)!r}, {str(image.deps)!r}]\n"
        "import uvicorn, app\n"
        f"uvicorn.run(app.web(), uds={str(sock)!r}, log_level='warning')\n"
    )


def fresh_cmd(image: Image, sock: Path) -> list[str]:
    return [sys.executable, "-s", "-c", fresh_script(image, sock)]


def bwrap_cmd(image: Image, sock: Path) -> list[str] | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    layers, sock_dir = str(image.layers), str(sock.parent)
    return [
        bwrap,
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
        # The work dir lives under /tmp, which the tmpfs above hides: show the layers and the socket folder.
        "--ro-bind",
        layers,
        layers,
        "--bind",
        sock_dir,
        sock_dir,
        "--unshare-all",
        "--die-with-parent",
        "--",
        *fresh_cmd(image, sock),
    ]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- memory ---------------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB figures from /proc/PID/smaps_rollup, plus uss = Private_Clean + Private_Dirty."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    out["uss"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def mb(kb: float) -> float:
    return round(kb / 1024, 2)


# -- statistics -------------------------------------------------------------------------------------


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p99": round(percentile(ms, 99), 2),
        "mean": round(statistics.fmean(ms), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }
