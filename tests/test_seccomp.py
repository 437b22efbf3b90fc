"""osless.runtime.seccomp on the real kernel: a child process applies the filter, then probes it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from osless.runtime import seccomp

needs_seccomp = pytest.mark.skipif(
    seccomp.unavailable_reason() is not None, reason=f"no seccomp here: {seccomp.unavailable_reason()}"
)

# Run as `python -c PROBE filtered|control`; prints one JSON object: each probe's result, an errno
# (0 for success) for the syscalls the filter should refuse.
PROBE = r"""
import ctypes, json, os, socket, subprocess, sys, tempfile, threading, time
import pyseccomp
from osless.runtime import seccomp

libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
SIGCHLD = 17
PTRACE_ATTACH = 16
NS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
      "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
      "CLONE_NEWNET": 0x40000000}

def nr(name):
    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)

def err(result):
    return ctypes.get_errno() if result == -1 else 0

def status():
    lines = open("/proc/self/status").read().splitlines()
    return {k: v for k, _, v in (l.partition(":\t") for l in lines) if k in ("Seccomp", "NoNewPrivs")}

def reap(pid):
    while True:
        _, st = os.waitpid(pid, 0)
        if os.WIFEXITED(st) or os.WIFSIGNALED(st):
            return st

def raw_clone(flags):
    ctypes.set_errno(0)
    pid = libc.syscall(L(nr("clone")), L(flags | SIGCHLD), L(0), L(0), L(0), L(0))
    if pid == 0:
        os._exit(0)
    if pid > 0:
        reap(pid)
    return err(pid)

def ptrace_attach():
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    ctypes.set_errno(0)
    result = err(libc.ptrace(L(PTRACE_ATTACH), L(pid), None, None))
    os.kill(pid, 9)
    reap(pid)
    return result

def call(fn, *args):
    ctypes.set_errno(0)
    return err(fn(*args))

out = {}
if sys.argv[1] == "filtered":
    out["before"] = status()
    seccomp.apply()
    out["status"] = status()

# what must keep working
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork_exit"] = os.waitstatus_to_exitcode(reap(pid))
ids = []
t = threading.Thread(target=lambda: ids.append(threading.get_native_id()))
t.start()
t.join()
out["thread_ran"] = len(ids) == 1 and ids[0] != threading.get_native_id()
out["true"] = subprocess.run(["true"]).returncode
grep = ["grep", "-E", "^(Seccomp|NoNewPrivs):", "/proc/self/status"]
out["child_status"] = subprocess.run(grep, capture_output=True, text=True).stdout
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "f"), "w") as f:
        f.write("hello")
    out["file"] = open(os.path.join(d, "f")).read()
a, b = socket.socketpair()
a.sendall(b"ping")
out["socketpair"] = b.recv(4).decode()
srv = socket.create_server(("127.0.0.1", 0))
cli = socket.create_connection(srv.getsockname())
conn, _ = srv.accept()
cli.sendall(b"tcp")
out["tcp"] = conn.recv(3).decode()

# what must be refused (CLONE_NEWUSER last: in the control run it leaves us an unmapped uid)
denied = {}
denied["mount"] = call(libc.mount, b"none", b"/nonexistent/osless", b"tmpfs", ctypes.c_ulong(0), None)
denied["unshare_newns"] = call(libc.unshare, NS["CLONE_NEWNS"])
fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
denied["setns"] = call(libc.setns, fd, 0)
os.close(fd)
denied["ptrace_attach"] = ptrace_attach()
denied["bpf"] = call(libc.syscall, L(nr("bpf")), L(0), None, L(0))
denied["keyctl"] = call(libc.syscall, L(nr("keyctl")), L(0), L(-3), L(0))  # GET_KEYRING_ID, session
for name, flag in NS.items():
    denied["clone_" + name] = raw_clone(flag)
out["clone3"] = call(libc.syscall, L(nr("clone3")), None, L(0))
denied["unshare_newuser"] = call(libc.unshare, NS["CLONE_NEWUSER"])
out["denied"] = denied
if sys.argv[1] == "filtered":
    seccomp.apply()  # filters stack: loading a second one works
    filters = open("/proc/self/status").read().split("Seccomp_filters:\t")[1]
    out["filters_after_second_apply"] = filters.split()[0]
print(json.dumps(out))
"""


def probe(mode: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


@needs_seccomp
def test_the_filter_refuses_escapes_and_keeps_ordinary_work_going() -> None:
    out = probe("filtered")
    assert out["before"]["Seccomp"] == "0"
    assert out["status"] == {"Seccomp": "2", "NoNewPrivs": "1"}
    # inherited across fork and exec
    assert out["child_status"] == "NoNewPrivs:\t1\nSeccomp:\t2\n"
    # ordinary work: fork, threads (glibc's clone3 gets ENOSYS and falls back to clone), exec, I/O
    assert out["fork_exit"] == 7
    assert out["thread_ran"] is True
    assert out["true"] == 0
    assert out["file"] == "hello"
    assert out["socketpair"] == "ping"
    assert out["tcp"] == "tcp"
    assert out["clone3"] == errno.ENOSYS
    expected = [
        "mount",
        "unshare_newns",
        "setns",
        "ptrace_attach",
        "bpf",
        "keyctl",
        *(f"clone_CLONE_NEW{ns}" for ns in ("NS", "CGROUP", "UTS", "IPC", "USER", "PID", "NET")),
        "unshare_newuser",
    ]
    assert sorted(out["denied"]) == sorted(expected)
    assert out["denied"] == dict.fromkeys(expected, errno.EPERM)
    assert out["filters_after_second_apply"] == "2"


@needs_seccomp
@pytest.mark.skipif(os.geteuid() != 0, reason="without root most of these fail with EPERM anyway")
def test_without_the_filter_the_same_calls_are_not_refused_with_eperm() -> None:
    """The control: as root, the EPERMs above come from the filter, not from missing privileges."""
    if "Seccomp:\t0" not in Path("/proc/self/status").read_text():
        pytest.skip("this test process already runs under a seccomp filter")
    out = probe("control")
    assert out["clone3"] == errno.EINVAL  # a zero-sized clone_args
    refused = {name: e for name, e in out["denied"].items() if e == errno.EPERM}
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    if scope.exists() and scope.read_text().strip() == "3":
        refused.pop("ptrace_attach", None)
    assert refused == {}


def test_denied_names_cover_the_docker_like_list() -> None:
    assert len(set(seccomp.DENIED)) == len(seccomp.DENIED)
    required = [
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "unshare",
        "setns",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "bpf",
        "keyctl",
        "add_key",
        "request_key",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "swapon",
        "swapoff",
        "acct",
        "quotactl",
        "syslog",
        "perf_event_open",
        "userfaultfd",
        "open_by_handle_at",
        "name_to_handle_at",
        "lookup_dcookie",
        "fanotify_init",
        "iopl",
        "ioperm",
        "settimeofday",
        "clock_settime",
        "adjtimex",
        "clock_adjtime",
        "mount_setattr",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsmount",
        "fsconfig",
        "fspick",
        "personality",
        "uselib",
        "vhangup",
        "pidfd_getfd",
        "kcmp",
    ]
    assert set(required) <= set(seccomp.DENIED)
    assert "clone" not in seccomp.DENIED and "clone3" not in seccomp.DENIED


def test_without_pyseccomp_the_reason_is_given_and_apply_refuses() -> None:
    code = """if True:
        import json, sys
        sys.modules["pyseccomp"] = None  # makes `import pyseccomp` fail as if it were not installed
        from osless.runtime import seccomp
        try:
            seccomp.apply()
            error = None
        except seccomp.SeccompError as exc:
            error = str(exc)
        status = open("/proc/self/status").read()
        print(json.dumps([seccomp.unavailable_reason(), error, "Seccomp:\\t0" in status]))
    """
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    reason, error, unfiltered = json.loads(proc.stdout)
    assert reason == "pyseccomp is not installed (pip install pyseccomp)"
    assert error == "cannot load the seccomp filter: pyseccomp is not installed (pip install pyseccomp)"
    assert unfiltered is True
