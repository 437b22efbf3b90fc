"""Runs at build time, like any sdist's setup.py: it records what it can see and reach, in the package.

`targets.json` beside it (written by the test) names what to try: paths to read or list, TCP
addresses to connect to directly, hosts to ask the build's egress proxy for.
"""

import errno
import json
import os
import resource
import signal
import socket
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def outcome(fn):
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__


def read(path):
    with open(path, "rb") as f:
        f.read(1)
    return "read"


def listdir(path):
    os.listdir(path)
    return "listed"


def write(path):
    with open(path, "w"):
        return "written"


def connect(host, port):
    socket.create_connection((host, port), timeout=5).close()
    return "connected"


def via_proxy(host):
    with socket.create_connection(("127.0.0.1", 3128), timeout=10) as s:
        # chr(): setuptools' legacy backend rewrites a backslash-r-backslash-n in setup.py's text.
        crlf = chr(13) + chr(10)
        if host.endswith(".osless"):  # another osless app: plain http, through the gateway
            s.sendall(f"GET http://{host}/ HTTP/1.1{crlf}Host: {host}{crlf}{crlf}".encode())
        else:
            s.sendall(f"CONNECT {host}:443 HTTP/1.1{crlf}Host: {host}:443{crlf}{crlf}".encode())
        return int(s.recv(64).split()[1])


def forks(limit):
    """Fork (each child sleeps) until the kernel refuses, or `limit`: how many, and why it stopped."""
    pids, stopped = [], None
    try:
        while len(pids) < limit:
            pid = os.fork()
            if pid == 0:
                try:
                    os.execv("/bin/sleep", ["sleep", "120"])
                finally:
                    os._exit(1)
            pids.append(pid)
    except OSError as e:
        stopped = errno.errorcode.get(e.errno)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
    return {"count": len(pids), "stopped": stopped}


def plant(target):
    """Leave in the layer being installed what its new owner must not trip on: a link to a host file
    (`target`), a fifo and a set-uid file."""
    layer = "/build/layer"
    if not os.path.isdir(layer):
        return "no layer"
    os.symlink(target, os.path.join(layer, "planted-link"))
    os.mkfifo(os.path.join(layer, "planted-fifo"))
    suid = os.path.join(layer, "planted-suid")
    with open(suid, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(suid, 0o4777)
    return "planted"


def spy():
    with open(os.path.join(HERE, "targets.json")) as f:
        targets = json.load(f)
    return {
        "uid_map": open("/proc/self/uid_map").read().split(),
        "getuid": os.getuid(),
        "nproc": list(resource.getrlimit(resource.RLIMIT_NPROC)),
        "read": {p: outcome(lambda p=p: read(p)) for p in targets["read"]},
        "list": {p: outcome(lambda p=p: listdir(p)) for p in targets["list"]},
        "write": {p: outcome(lambda p=p: write(p)) for p in targets["write"]},
        "connect": {f"{h}:{p}": outcome(lambda h=h, p=p: connect(h, p)) for h, p in targets["connect"]},
        "resolve": outcome(lambda: socket.getaddrinfo("pypi.org", 443) and "resolved"),
        "proxy": {h: outcome(lambda h=h: via_proxy(h)) for h in targets["proxy"]},
        "env": sorted(os.environ),
        "forks": forks(targets["forks"]),
        "plant": outcome(lambda: plant(targets["plant"])),
    }


# Only the wheel's build writes the report; asking for metadata needs the module to exist.
report = spy() if "bdist_wheel" in sys.argv else None
with open(os.path.join(HERE, "spy_report.py"), "w") as f:
    f.write(f"REPORT = {json.dumps(report)!r}\nimport json\nREPORT = json.loads(REPORT)\n")

setup(name="spy", version="1.0", py_modules=["spy_report"])
