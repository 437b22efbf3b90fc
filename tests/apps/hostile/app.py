"""An app that tries to break out of its sandbox. Every function reports what happened, exactly."""

import ctypes
import errno
import http.client
import os
import signal
import socket
import threading
import time
import urllib.request

import osless

app = osless.App("hostile")
libc = ctypes.CDLL(None, use_errno=True)


def outcome(fn):
    try:
        return {"ok": fn()}
    except OSError as e:
        return {"error": type(e).__name__, "errno": e.errno}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}


def syscall_errno(result):
    return {"errno": ctypes.get_errno() if result != 0 else 0}


@app.function()
def read(event, ctx):
    return outcome(lambda: open(event["path"], "rb").read(64).decode("latin-1"))


@app.function()
def listdir(event, ctx):
    return outcome(lambda: sorted(os.listdir(event["path"])))


@app.function()
def write(event, ctx):
    def go():
        with open(event["path"], "a") as f:
            f.write("owned\n")
        return "written"

    return outcome(go)


@app.function()
def whoami(event, ctx):
    with open("/proc/self/status") as f:
        status = f.read()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return {
        "uid": os.getuid(),
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "cap_eff": fields["CapEff"].strip(),
        "cap_bnd": fields["CapBnd"].strip(),
        "no_new_privs": fields["NoNewPrivs"].strip(),
        "seccomp": fields["Seccomp"].strip(),
        "uid_map": open("/proc/self/uid_map").read().split(),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "proxy": os.environ.get("HTTP_PROXY"),
    }


@app.function()
def connect(event, ctx):
    def go():
        if "unix" in event:
            s = socket.socket(socket.AF_UNIX)
            s.connect(event["unix"])
        else:
            s = socket.create_connection((event["host"], event["port"]), timeout=2)
        s.close()
        return "connected"

    return outcome(go)


@app.function()
def fetch(event, ctx):
    if event.get("via_proxy"):
        # NO_PROXY keeps 127.0.0.1 direct; a hostile app can still aim the proxy at it by hand.
        conn = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
        conn.request("GET", event["url"])
        r = conn.getresponse()
        return {"status": r.status, "body": r.read().decode()[:300]}
    try:
        with urllib.request.urlopen(event["url"], timeout=10) as r:
            return {"status": r.status, "body": r.read().decode()[:300]}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()[:300]}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)}


@app.function()
def escape(event, ctx):
    """The system calls a container escape starts with."""
    out = {}
    out["mount"] = syscall_errno(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None))
    out["unshare_user"] = syscall_errno(libc.unshare(0x10000000))
    out["unshare_mount"] = syscall_errno(libc.unshare(0x00020000))
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    out["setns"] = syscall_errno(libc.setns(fd, 0))
    os.close(fd)
    child = os.fork()
    if child == 0:
        time.sleep(5)
        os._exit(0)
    out["ptrace"] = syscall_errno(libc.ptrace(16, child, None, None))  # PTRACE_ATTACH
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    out["chroot"] = outcome(lambda: os.chroot("/tmp"))
    out["sethostname"] = syscall_errno(libc.sethostname(b"evil", 4))
    out["setuid"] = outcome(lambda: os.setuid(1))
    return out


@app.function(timeout_s=60)
def forkbomb(event, ctx):
    children = []
    error = None
    try:
        for _ in range(100_000):
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        error = {"error": type(e).__name__, "errno": e.errno}
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return {"forked": len(children), **(error or {})}


@app.function(timeout_s=60)
def fill_tmp(event, ctx):
    written = 0
    chunk = b"x" * (1 << 20)
    try:
        with open("/tmp/fill", "wb") as f:
            while written < 10 << 30:
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as e:
        os.unlink("/tmp/fill")
        return {"written_mb": written >> 20, "error": type(e).__name__, "errno": e.errno}
    return {"written_mb": written >> 20}


@app.function(timeout_s=60)
def spin(event, ctx):
    deadline = time.time() + float(event["seconds"])

    def burn():
        while time.time() < deadline:
            pass

    threads = [threading.Thread(target=burn) for _ in range(int(event.get("threads", 4)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return "done"


@app.function()
def hog(event, ctx):
    chunks = []
    for _ in range(64):
        chunks.append(bytearray(16 << 20))
    return len(chunks)


@app.function()
def errno_name(event, ctx):
    return errno.errorcode.get(int(event), "?")


@app.function()
def readonly(event, ctx):
    return {path: bool(os.statvfs(path).f_flag & os.ST_RDONLY) for path in event["paths"]}


@app.function()
def leave_behind(event, ctx):
    import subprocess

    child = subprocess.Popen(["sleep", "1000"], start_new_session=True)  # escapes its process group
    return {"pid": child.pid}


@app.function()
def token(event, ctx):
    return os.environ.get("OSLESS_TOKEN")  # its own credential: where an attack on the API starts


@app.function(timeout_s=120)
def flood(event, ctx):
    """Writes `mb` MiB to stdout as fast as it can, in lines of `line` bytes (0: one endless line)."""
    import sys

    size = int(event.get("line", 1024))
    chunk = (b"x" * (size - 1) + b"\n") if size else b"y" * (1 << 20)
    total = int(event["mb"]) << 20
    written = 0
    while written < total:
        sys.stdout.buffer.write(chunk)
        written += len(chunk)
    sys.stdout.buffer.write(b"\nflood done\n")
    sys.stdout.buffer.flush()
    return written
