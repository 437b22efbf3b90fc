"""A hostile app's manifest: the build stores what the app's own inspector process prints, checking
only its volumes; the node agent then sizes the instance's cgroups from it.

Finding A1 (broken): `memory_mb` outside the SDK's 16..65536 reaches the cgroups as it is. -1 makes
the first write fail (EINVAL), `Supervisor._new_cgroup` logs "resource limits not applied" and runs
the instance in no cgroup at all: no memory, CPU or pids limit (a fork bomb reaches the host's
process table). 10**9 MB is taken as the memory limit: none in effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.attack.helpers import deploy_outcome, ready_instance, write_app
from tests.platform import Platform

LIAR = """\
import os
import threading

import osless

app = osless.App({name!r})


@app.function(memory_mb=128)
def probe(event, ctx):
    # More threads than an instance's pids limit (128) allows.
    stop = threading.Event()
    started = 0
    try:
        for _ in range(200):
            threading.Thread(target=stop.wait, daemon=True).start()
            started += 1
    except RuntimeError:
        pass
    finally:
        stop.set()
    return {{"threads": started, "cgroup": open("/proc/self/cgroup").read()}}


# The build's inspector prints app.manifest(): the release gets whatever this returns.
_honest = app.manifest


def _lying_manifest():
    manifest = _honest()
    for spec in manifest["functions"].values():
        spec["memory_mb"] = {memory_mb}
    return manifest


app.manifest = _lying_manifest
"""


def _host_memory_limit(pid: int) -> int | None:
    """The memory limit of the cgroup the host pid is in (v1 or v2), None if it is in none of ours."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "osless" not in path:
            continue
        if controllers == "memory":
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
        if controllers == "":
            text = Path(f"/sys/fs/cgroup{path}/memory.max").read_text().strip()
            return 1 << 62 if text == "max" else int(text)
    return None


@pytest.mark.parametrize("memory_mb", [-1, 10**9], ids=["negative", "huge"])
def test_a_lying_manifest_cannot_lift_the_instance_limits(
    platform: Platform, tmp_path: Path, memory_mb: int
) -> None:
    name = f"liar-{'neg' if memory_mb < 0 else 'huge'}"
    deploy = deploy_outcome(platform, write_app(tmp_path / name, LIAR.format(name=name, memory_mb=memory_mb)))
    if deploy["status"] == "failed":
        return  # refused at build time: held
    release = platform.http("GET", f"/v1/apps/{name}/releases/{deploy['release']}").json()
    print("stored manifest functions:", json.dumps(release["manifest"]["functions"]))
    status, out = platform.invoke(name, "probe")
    assert status == 200, out
    instance = ready_instance(platform, name)
    limit = _host_memory_limit(instance["status"]["pid"])
    print(f"threads started: {out['threads']}; memory limit: {limit}; cgroups:\n{out['cgroup']}")
    assert limit is not None, "the instance runs in no cgroup of the platform's"
    assert limit <= 65536 * 1024 * 1024, f"memory limit {limit} bytes: larger than any app may ask"
    assert out["threads"] < 200, "the instance is not held to its pids limit"
