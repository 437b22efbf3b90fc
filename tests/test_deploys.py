"""Deploy, invoke, redeploy, roll back, and builds that fail: through the real CLI and API."""

from __future__ import annotations

import gzip
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx

from osless.api.routes.deploys import DEPLOY_LOG_CAP
from osless.builder import pack
from tests.platform import EXAMPLES, Platform, copy_app
from tests.test_build import bomb

APPS = Path(__file__).parent / "apps"


def set_version(src: Path, version: str) -> None:
    app = src / "app.py"
    app.write_text(app.read_text().replace('VERSION = "one"', f'VERSION = "{version}"'))


def test_deploy_then_invoke_hello(platform: Platform, hello: dict[str, object]) -> None:
    assert hello["status"] == "succeeded"
    out = platform.cli("invoke", "hello.greet", '{"name": "Ada"}')
    result = json.loads(out.stdout)
    assert result["message"] == "Hello, Ada!"
    assert len(result["request_id"]) >= 16


def test_invoke_reads_the_event_from_stdin(platform: Platform, hello: dict[str, object]) -> None:
    out = platform.cli("invoke", "hello.greet", "-", input='{"name": "Grace"}')
    assert json.loads(out.stdout)["message"] == "Hello, Grace!"


def test_redeploy_and_rollback(platform: Platform, tmp_path: Path) -> None:
    src = copy_app(APPS / "e2e_versioned", tmp_path / "versioned")
    first = platform.deploy(src)
    assert json.loads(platform.cli("invoke", "versioned.version").stdout) == "one"

    set_version(src, "two")
    second = platform.deploy(src)
    assert second["release"] == first["release"] + 1
    assert second["deps_cached"] is True  # a code-only change reuses the dependency layer
    assert json.loads(platform.cli("invoke", "versioned.version").stdout) == "two"
    assert httpx.get(f"{platform.gateway}/versioned/").text == "two"

    rolled = platform.cli_json("rollback", "versioned")
    assert rolled["description"] == f"Rollback to v{first['release']}"
    platform.wait_for(
        lambda: httpx.get(f"{platform.gateway}/versioned/").text == "one", what="rollback to serve"
    )
    assert json.loads(platform.cli("invoke", "versioned.version").stdout) == "one"

    again = platform.cli_json("rollback", "versioned", "--to", str(second["release"]))
    assert again["image"] == second["image"]
    platform.wait_for(lambda: httpx.get(f"{platform.gateway}/versioned/").text == "two", what="roll forward")

    history = platform.cli_json("releases", "versioned")
    assert [r["version"] for r in history] == [4, 3, 2, 1]
    table = platform.cli("releases", "versioned").stdout
    assert "Rollback to v1" in table and "Rollback to v2" in table


def test_failing_build_keeps_the_running_release(platform: Platform, tmp_path: Path) -> None:
    src = copy_app(APPS / "e2e_versioned", tmp_path / "versioned2")
    good = platform.deploy(src, "--name", "keeper")
    broken = copy_app(APPS / "e2e_broken", tmp_path / "broken")
    r = platform.cli("deploy", str(broken), "--name", "keeper", check=False)
    assert r.returncode == 1
    assert "no_such_module_for_osless_tests" in r.stdout  # the traceback streams to the CLI
    assert "deploy failed" in r.stderr and "no_such_module_for_osless_tests" in r.stderr
    app = platform.http("GET", "/v1/apps/keeper").json()
    assert app["current_release"] == good["release"]
    assert httpx.get(f"{platform.gateway}/keeper/").text == "one"


def test_dependency_from_requirements_is_built_and_cached(platform: Platform, tmp_path: Path) -> None:
    src = tmp_path / "deps"
    src.mkdir()
    (src / "requirements.txt").write_text("six==1.16.0\n")
    (src / "app.py").write_text(
        "import osless, six\napp = osless.App('deps')\n"
        "@app.function()\ndef which(event, ctx):\n    return {'six': six.__version__, 'file': six.__file__}\n"
    )
    first = platform.deploy(src)
    assert first["deps_cached"] is False
    result = json.loads(platform.cli("invoke", "deps.which").stdout)
    assert result["six"] == "1.16.0"
    assert "/images/layers/" in result["file"]  # from the dependency layer, not the host
    (src / "app.py").write_text((src / "app.py").read_text() + "\n# a code-only change\n")
    second = platform.deploy(src)
    assert second["deps_cached"] is True


def test_deploy_output_shows_build_progress(platform: Platform, tmp_path: Path) -> None:
    src = copy_app(EXAMPLES / "hello", tmp_path / "hello")
    r = platform.cli("deploy", str(src), "--name", "hello-progress")
    assert "==> Resolving dependencies" in r.stdout
    assert "Deployed hello-progress" in r.stdout
    assert f"{platform.gateway}/hello-progress/" in r.stdout


def test_deploy_of_a_missing_folder_is_one_clear_line(platform: Platform, tmp_path: Path) -> None:
    r = platform.cli("deploy", str(tmp_path / "nowhere"), check=False)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "is not a folder" in r.stderr


def test_function_error_shows_its_traceback(platform: Platform) -> None:
    platform.deploy(APPS / "e2e_crashy", "--name", "fails")
    r = platform.cli("invoke", "fails.fails", check=False)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and 'raise ValueError("the answer is not 42")' in r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == "error: ValueError: the answer is not 42"


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _wait_failed(platform: Platform, deploy_id: str, timeout: float = 60) -> dict[str, Any]:
    def failed() -> dict[str, Any] | None:
        d: dict[str, Any] = platform.http("GET", f"/v1/deploys/{deploy_id}").json()
        return d if d["status"] not in ("queued", "building") else None

    d: dict[str, Any] = platform.wait_for(failed, timeout=timeout, what=f"deploy {deploy_id} to end")
    assert d["status"] == "failed"
    return d


def test_a_longname_bomb_fails_fast_and_small(own_platform: Platform) -> None:
    # Finding 4: a 300 KB upload whose GNU long name is 300 MB once unpacked.
    platform = own_platform
    assert platform.proc is not None
    archive = bomb(tarfile.GNUTYPE_LONGNAME, 300 * 1024 * 1024)
    assert len(archive) < 400 * 1024
    before = _vm_hwm_mb(platform.proc.pid)
    r = platform.http("POST", "/v1/deploys", content=archive, headers={"content-type": "application/gzip"})
    assert r.status_code == 202
    deploy = _wait_failed(platform, r.json()["id"])
    log = platform.http("GET", f"/v1/deploys/{deploy['id']}/log")
    # Timed from the builder's first line, not the upload: this new platform's builder may still be
    # starting when the upload is queued (5 s and more under load), and that is not the build's time.
    first = json.loads(log.text.splitlines()[0])
    assert first["line"].startswith("==> Builder ")
    assert deploy["finished_at"] - first["ts"] < 5
    assert "GNU long name of 314572800 bytes, past the limit of 64 KiB" in deploy["error"]
    assert len(deploy["error"]) < 400
    assert _vm_hwm_mb(platform.proc.pid) - before < 100
    listed = platform.http("GET", "/v1/deploys")
    assert len(listed.content) < 4096 and listed.json()["items"][0]["id"] == deploy["id"]
    assert len(log.content) < 8192
    data = platform.data_dir
    # The API's and its builder's (under data/builder) together; not the runtime layers (21 MB each,
    # the node's and the builder's), made at start whatever is deployed.
    on_disk = sum(
        p.stat().st_size
        for p in data.rglob("*")
        if p.is_file() and not p.is_symlink() and "runtime" not in p.relative_to(data).parts
    )
    assert on_disk < 16 * 1024 * 1024


def test_a_build_that_prints_without_end_is_stored_and_logged_capped(
    platform: Platform, tmp_path: Path
) -> None:
    src = tmp_path / "loud"
    src.mkdir()
    (src / "app.py").write_text(
        "import sys\n"
        "import osless\n"
        "app = osless.App('loud')\n"
        "sys.stderr.write('L' * 30_000_000 + '\\n')\n"
        "for i in range(120_000):\n"
        "    print('line', i, 'x' * 80, file=sys.stderr)\n"
        "raise RuntimeError('E' * 100_000)\n"
    )
    r = platform.http("POST", "/v1/deploys", content=pack(src), headers={"content-type": "application/gzip"})
    deploy = _wait_failed(platform, r.json()["id"], timeout=120)
    assert len(deploy["error"]) <= 4096 and "characters cut" in deploy["error"]
    assert deploy["error"].startswith("Importing the app") and "deploy again" in deploy["error"]
    log = platform.http("GET", f"/v1/deploys/{deploy['id']}/log").content.splitlines()
    assert sum(len(line) + 1 for line in log[:-1]) <= DEPLOY_LOG_CAP
    last = json.loads(log[-2])  # the deploy's record comes after the log's last line
    assert "reached its cap" in last["line"]


def _gzip_bomb(unpacked_mb: int) -> bytes:
    """A tar.gz of one file of `unpacked_mb` MiB of zeros, some 1,000 times smaller: the same
    gzip member repeated (a gzip stream may have many), so making it costs nothing."""
    size = unpacked_mb << 20
    head = tarfile.TarInfo("app.py")
    head.size = size
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    end = gzip.compress(bytes(1024))  # tar's two empty end blocks
    return gzip.compress(head.tobuf(format=tarfile.GNU_FORMAT)) + zeros * unpacked_mb + end


def test_a_gzip_bomb_fails_at_once_without_filling_the_disk(platform: Platform) -> None:
    bomb = _gzip_bomb(1024)  # 1 GiB unpacked
    assert len(bomb) < 2 << 20
    assert platform.proc is not None
    data_before = sum(f.stat().st_size for f in platform.data_dir.rglob("*") if f.is_file())
    t0 = time.monotonic()
    deploy = platform.http(
        "POST",
        "/v1/deploys",
        params={"app": "bomb"},
        content=bomb,
        headers={"content-type": "application/gzip"},
    ).json()
    final = platform.wait_for(
        lambda: (
            (d := platform.http("GET", f"/v1/deploys/{deploy['id']}").json())["status"]
            not in ("queued", "building")
            and d
        ),
        what="the build to fail",
    )
    assert time.monotonic() - t0 < 10
    assert final["status"] == "failed" and "the source is larger than 200 MB unpacked" in final["error"]
    grown = sum(f.stat().st_size for f in platform.data_dir.rglob("*") if f.is_file()) - data_before
    assert grown < 50 << 20, grown  # nothing of it was written out
    assert platform.http("GET", "/v1/apps/bomb").status_code == 404


def test_a_missing_module_says_which_package_to_add_once(platform: Platform, tmp_path: Path) -> None:
    src = tmp_path / "needsml"
    src.mkdir()
    (src / "app.py").write_text("import osless\nimport sklearn\napp = osless.App('needsml')\n")
    r = platform.cli("deploy", str(src), check=False)
    assert r.returncode == 1
    out = r.stdout + r.stderr
    assert "app.py imports sklearn, which is not installed" in r.stderr
    assert "scikit-learn" in r.stderr and "create" in r.stderr  # no requirements.txt: create one
    # The error once (not in the log's last line and again as the command's error); the traceback once.
    assert out.count("which is not installed") == 1 and out.count("No module named 'sklearn'") == 1
    assert "/layers/" not in out  # no absolute build path
