"""An app's sandbox: its own user, mount, pid, ipc, uts and net namespaces, built in three steps.

1. `prepare` (still real root, in a new mount namespace): build the app's root file system on a
   tmpfs — the runtime and the image bound read-only at their own paths, a size-capped /tmp, a few
   device nodes, a minimal /etc, the app's socket folder and volumes writable — then make it
   read-only. Binding as real root matters: the unprivileged uid the app runs as could not even
   look up a path such as /root/.pyenv.
2. `isolate`: unshare the user namespace and the rest. Mounts made in step 1 become locked: from
   inside, nothing can be unmounted to reveal what is underneath. The parent maps root inside to
   an unprivileged uid outside (`write_id_maps`).
3. `enter` (in the first process of the new pid namespace): its own /proc, chroot into the new root,
   hostname, loopback up, the egress forwarder, rlimits, every capability dropped, no_new_privs
   and the seccomp filter. Only then is the app imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import resource
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from osless.runtime import forwarder, seccomp

__all__ = [
    "SandboxError",
    "SandboxSpec",
    "drop_capabilities",
    "enter",
    "isolate",
    "missing_protections",
    "prepare",
    "runtime_paths",
    "spawn",
    "write_id_maps",
]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64 and aarch64 differ; only used where it works, chroot otherwise
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
DEVICES = ("null", "zero", "full", "random", "urandom")
HOST_ETC = (
    "ssl",
    "ca-certificates",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "mime.types",
    "os-release",
)

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxError(Exception):
    """A step of building the sandbox failed; the message names the step."""


@dataclass
class SandboxSpec:
    """What the node agent asks for one app: sent as JSON in the root zygote's `spawn` request."""

    uid: int  # the host uid (and gid) that root inside the sandbox is
    hostname: str
    root: str  # an empty host folder; each sandbox mounts its own tmpfs on it, in its own namespace
    readonly: list[str] = field(default_factory=list)  # image layers, bound at the same path
    writable: list[str] = field(default_factory=list)  # the app's socket folder, at the same path
    volumes: dict[str, str] = field(default_factory=dict)  # path inside -> host folder
    # Host folders never to show, should a bound folder hold them: the data dir, the interpreter's
    # site-packages, the platform's virtualenv.
    hide: list[str] = field(default_factory=list)
    tmp_mb: int = 64
    proxy_socket: str | None = None  # the node's egress proxy for this app
    proxy_port: int = 3128
    nofile: int = 4096
    fsize_mb: int = 1024
    seccomp: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxSpec:
        return cls(**data)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            src and src.encode(),
            dst.encode(),
            fstype and fstype.encode(),
            ctypes.c_ulong(flags),
            data and data.encode(),
        ),
        f"mount {src or fstype or ''} on {dst}",
    )


def _locked_flags(path: str) -> int:
    """The flags a read-only remount must keep: the kernel refuses to clear nosuid/nodev/noexec."""
    f = os.statvfs(path).f_flag
    return (
        (MS_NOSUID if f & os.ST_NOSUID else 0)
        | (MS_NODEV if f & os.ST_NODEV else 0)
        | (MS_NOEXEC if f & os.ST_NOEXEC else 0)
    )


def _bind(src: str, root: str, dst: str, *, readonly: bool) -> None:
    target = root + dst
    if os.path.isdir(src):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "w").close()
    _mount(src, target, None, MS_BIND | MS_REC)
    if readonly:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | _locked_flags(src))


def runtime_paths() -> list[str]:
    """The host folders the interpreter needs inside the sandbox: itself, its stdlib and the system's
    libraries. Not its site-packages (hidden: `SandboxSpec.hide`), nor the platform's virtualenv:
    the runtime's own packages come in a layer of their own (`images.runtime`), bound as a layer."""
    paths = ["/usr", sys.base_prefix]
    for lib in ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"):
        if os.path.isdir(lib) and not os.path.islink(lib):
            paths.append(lib)
    return _outermost(paths)


def _outermost(paths: list[str]) -> list[str]:
    out: list[str] = []
    for p in sorted({os.path.realpath(p) for p in paths}):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def prepare(spec: SandboxSpec) -> None:
    """Step 1, as real root: a new mount namespace holding the app's read-only root at `spec.root`."""
    # What is made here (folders leading to the binds, /etc's files) must be readable by the app's
    # uid, whatever umask the platform keeps for its own files (`osless up`'s is 077).
    os.umask(0o022)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate to the host
    root = spec.root
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=2m,mode=755")
    # The fixed structure first: binds below may land inside /tmp (a data dir under /tmp, in tests).
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec.tmp_mb}m,mode=1777")
    os.makedirs(root + "/dev")
    _mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for dev in DEVICES:
        if os.path.exists(f"/dev/{dev}"):
            _bind(f"/dev/{dev}", root, f"/dev/{dev}", readonly=False)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    os.makedirs(root + "/proc")
    _write_etc(spec, root)
    for path in runtime_paths():
        _bind(path, root, path, readonly=True)
    for lib in ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"):
        if os.path.islink(lib):  # merged-/usr systems: /lib -> usr/lib
            os.symlink(os.readlink(lib), root + lib)
    for path in spec.hide:  # the data dir or site-packages, should a runtime path contain them
        if os.path.isdir(root + path):
            _mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV | MS_RDONLY, "size=4k,mode=755")
    for path in spec.readonly:
        _bind(path, root, path, readonly=True)
    for path in spec.writable:
        _bind(path, root, path, readonly=False)
    if spec.proxy_socket:
        _bind(spec.proxy_socket, root, "/run/osless/egress.sock", readonly=False)
    for inside, host in spec.volumes.items():
        _bind(host, root, inside, readonly=False)
    # Read-only from here on; the flag is locked once the user namespace exists.
    _mount(None, root, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # Step 3 works relative to this folder: the app's uid could not look up its host path.
    os.chdir(root)


def _write_etc(spec: SandboxSpec, root: str) -> None:
    etc = root + "/etc"
    os.makedirs(etc, exist_ok=True)
    with open(etc + "/passwd", "w") as f:
        f.write("root:x:0:0:app:/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/:/usr/sbin/nologin\n")
    with open(etc + "/group", "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")
    with open(etc + "/hosts", "w") as f:
        f.write(f"127.0.0.1 localhost {spec.hostname}\n::1 localhost\n")
    with open(etc + "/hostname", "w") as f:
        f.write(spec.hostname + "\n")
    for name in HOST_ETC:
        if os.path.exists("/etc/" + name):
            _bind("/etc/" + name, root, "/etc/" + name, readonly=True)


def isolate() -> None:
    """Step 2: new user, mount, pid, ipc, uts and net namespaces; the next child is pid 1."""
    _check(
        _libc.unshare(
            CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
        ),
        "unshare(user, mount, pid, ipc, uts, net)",
    )


def write_id_maps(pid: int, uid: int) -> None:
    """From the parent: root inside the child's user namespace is `uid` outside, nobody else exists."""
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"0 {uid} 1\n")
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny\n")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"0 {uid} 1\n")


def enter(spec: SandboxSpec) -> None:
    """Step 3, as pid 1 of the new pid namespace, in the new root (`prepare` left us there)."""
    _mount("proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # the cwd is the new root (`prepare`)
    # pivot_root is refused when the host itself runs us in a chroot; a chroot is as tight here
    # because chroot is denied by seccomp and CAP_SYS_CHROOT is dropped below.
    if _libc.syscall(SYS_PIVOT_ROOT, b".", b".") == 0:
        _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chroot(".")
    os.chdir("/")
    name = spec.hostname.encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    _loopback_up()
    os.environ["HOME"] = "/tmp"
    resource.setrlimit(resource.RLIMIT_NOFILE, (spec.nofile, spec.nofile))
    fsize = spec.fsize_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    drop_capabilities()
    if spec.seccomp:
        seccomp.apply()
    else:
        _set_no_new_privs()
    if spec.proxy_socket:
        # Started last, so the forwarder holds no capability and runs under the filter like the app.
        forwarder.start(spec.proxy_port, "/run/osless/egress.sock")
        proxy = f"http://127.0.0.1:{spec.proxy_port}"
        no_proxy = "localhost,127.0.0.1"
        os.environ.update(
            {
                "HTTP_PROXY": proxy,
                "HTTPS_PROXY": proxy,
                "http_proxy": proxy,
                "https_proxy": proxy,
                "NO_PROXY": no_proxy,
                "no_proxy": no_proxy,
            }
        )


def spawn(spec: SandboxSpec, child: Callable[[], NoReturn], before: Callable[[], None] | None = None) -> int:
    """Fork a keeper that builds the sandbox and runs `child()` as its pid 1; returns the keeper's pid.

    The keeper (outside the pid namespace, inside the others) waits for pid 1 and exits with its
    status. `before()` runs first in the keeper. Steps 1 to 3 above; the id maps are written here,
    by the caller, who must be root outside.
    """
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(unshared_r)
        os.close(mapped_w)
        status = 1
        try:
            _set_parent_death_signal()
            if os.getppid() != parent:
                os._exit(1)
            if before is not None:
                before()
            prepare(spec)
            isolate()
            os.write(unshared_w, b"u")
            os.close(unshared_w)
            if os.read(mapped_r, 1) != b"m":
                raise SandboxError("the parent did not map the sandbox's user ids")
            os.close(mapped_r)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            first = os.fork()  # the first child of a new pid namespace is its pid 1
            if first == 0:
                _set_parent_death_signal()
                enter(spec)
                child()
            _, wait_status = os.waitpid(first, 0)
            status = os.waitstatus_to_exitcode(wait_status)
            status = status if status >= 0 else 128 - status
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(unshared_w)
    os.close(mapped_r)
    try:
        # The keeper has unshared its user namespace; only its parent, root outside, may map its ids.
        ready, _, _ = select.select([unshared_r], [], [], 10.0)
        if ready and os.read(unshared_r, 1) == b"u":
            write_id_maps(pid, spec.uid)
            os.write(mapped_w, b"m")
    finally:
        os.close(unshared_r)
        os.close(mapped_w)
    return pid


def _set_parent_death_signal() -> None:
    _check(_libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets: nothing left to use."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 63
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _set_no_new_privs() -> None:
    _check(_libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def missing_protections() -> dict[str, str]:
    """What this host cannot give a sandbox, each with the reason; empty when everything works."""
    missing: dict[str, str] = {}
    if sys.platform != "linux":
        return {
            "namespaces": f"{sys.platform} has no Linux namespaces",
            "seccomp": "Linux only",
            "cgroups": "Linux only",
        }
    if os.geteuid() != 0:
        missing["uid mapping"] = "osless is not running as root: sandboxes cannot map root to another uid"
    with contextlib.suppress(OSError), open("/proc/sys/user/max_user_namespaces") as f:
        if int(f.read()) == 0:
            missing["user namespaces"] = "user.max_user_namespaces is 0"
    reason = seccomp.unavailable_reason()
    if reason:
        missing["seccomp"] = reason
    return missing
