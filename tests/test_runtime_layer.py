"""The runtime layer: an instance imports its app's layers, the stdlib and the runtime, never the
platform's virtualenv."""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from osless.images.runtime import DISTRIBUTIONS, hidden_site_packages, runtime_layer
from tests.platform import Platform, copy_app

APPS = Path(__file__).parent / "apps"
# Imported by the runtime, besides the stdlib: each one's distribution must be in DISTRIBUTIONS.
_PROBE = """
import json, sys
from osless.runtime import inspect, jail, zygote
from osless.runtime.instance import preload
preload()
import debugpy  # what a debug session imports (runtime/debugger.py)
std = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
std.add("cython_runtime")  # made by any Cython extension (httptools, uvloop) as it loads
tops = {m.split(".")[0] for m in list(sys.modules)}
outside = sorted(t for t in tops if t not in std and not t.startswith("_"))
print(json.dumps({"path": sys.path, "outside": outside}))
"""


def test_the_layer_holds_what_the_runtime_imports_and_no_more(tmp_path: Path) -> None:
    layer = runtime_layer(tmp_path / "runtime")
    older = tmp_path / "runtime" / ("0" * 64)  # an earlier install's
    older.mkdir()
    (older / "x.py").write_text("")
    assert runtime_layer(tmp_path / "runtime") == layer  # content-addressed: found again, not remade
    assert not older.exists()
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    # The layer's command, with the probe's text where the module's name goes.
    cmd = layer.command("MODULE")
    boot = cmd.index("-c") + 1
    cmd[boot] = cmd[boot].replace(
        "runpy.run_module(module, run_name='__main__', alter_sys=True)", "exec(open(module).read())"
    )
    cmd[-1] = str(probe)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/", env={})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    # The stdlib, then the layer: nothing of the platform's environment.
    stdlib = sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"]
    assert seen["path"][-1] == str(layer.path) and stdlib in seen["path"]
    assert not any(p.startswith(sys.prefix) or "site-packages" in p for p in seen["path"])
    expected = {
        "osless",
        "uvicorn",
        "click",
        "httptools",
        "websockets",
        "uvloop",
        "pyseccomp",
        "a2wsgi",
        "debugpy",
    }
    assert set(seen["outside"]) == expected
    tops = {p.name.removesuffix(".py") for p in layer.path.iterdir() if not p.name.endswith(".dist-info")}
    # And what instances import only when they trace (runtime.tracing): not at preload.
    tracing = {
        "opentelemetry",
        "typing_extensions",
        "google",
        "requests",
        "urllib3",
        "idna",
        "charset_normalizer",
    }
    assert tops == expected | tracing | {"certifi", "bin", "__pycache__"}
    assert set(DISTRIBUTIONS) == {importlib.metadata.distribution(n).name.lower() for n in DISTRIBUTIONS}
    assert {p.name for p in (layer.path / "osless").iterdir()} <= {
        "__init__.py",
        "py.typed",
        "runtime",
        "sdk",
        "__pycache__",
    }
    # Read-only, and compiled: the runtime runs with -B, so nothing would ever compile it later.
    assert stat.S_IMODE((layer.path / "uvicorn" / "__init__.py").stat().st_mode) == 0o444
    assert any((layer.path / "uvicorn" / "__pycache__").iterdir())
    assert os.path.realpath(layer.bin / "python") == os.path.realpath(layer.python)


def test_site_packages_are_hidden() -> None:
    hidden = hidden_site_packages()
    assert os.path.realpath(sys.prefix) in hidden  # the platform's virtualenv
    purelib = sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    assert os.path.realpath(purelib) in hidden or not os.path.isdir(purelib)


@pytest.fixture(scope="module")
def pinned(platform: Platform) -> dict[str, object]:
    return platform.deploy(APPS / "pinned")


def test_an_instance_imports_its_own_packages_and_the_runtimes_server(
    platform: Platform, pinned: dict[str, object]
) -> None:
    venv = sys.prefix
    purelib = sysconfig.get_path("purelib", vars={"base": sys.base_prefix, "platbase": sys.base_prefix})
    event = {"paths": [venv, str(Path(__file__).parent)], "listed": [purelib]}
    status, report = platform.invoke("pinned", "report", event)
    assert status == 200, report
    # The interpreter's own site-packages: an empty folder, where the host has pip and more.
    assert os.listdir(purelib) and report["listed"] == {purelib: []}
    # The platform's packages are not there, whatever it has installed.
    assert report["importable"] == {
        "yaml": False,
        "fastapi": False,
        "httpx": False,
        "pydantic": False,
        "typer": False,
    }
    assert report["visible"] == {venv: False, str(Path(__file__).parent): False}
    assert not any(p.startswith(venv) for p in report["path"])
    # h11, which the runtime does not import, is the app's own pin (the platform has 0.16.0).
    assert report["h11"][0] == "0.14.0"
    # uvicorn is the runtime's: imported before the app's layers were on the path.
    runtime_uvicorn = importlib.metadata.version("uvicorn")
    assert runtime_uvicorn != "0.30.6" and report["uvicorn"][0] == runtime_uvicorn
    assert "/runtime/" in report["uvicorn"][1]
    # The build's import saw the same uvicorn as an instance does.
    functions = platform.http("GET", "/v1/apps/pinned").json()
    assert f"built_with_uvicorn_{runtime_uvicorn.replace('.', '_')}" in json.dumps(functions)


def test_an_app_importing_what_it_did_not_declare_fails_the_build(platform: Platform, tmp_path: Path) -> None:
    root = copy_app(APPS / "build_hello", tmp_path / "undeclared")
    (root / "app.py").write_text(
        (root / "app.py").read_text().replace("import osless\n", "import osless\nimport yaml\n")
    )
    r = platform.cli("deploy", str(root), check=False)
    assert r.returncode != 0
    assert (
        "app.py imports yaml, which is not installed: create a requirements.txt next to the app that "
        "lists PyYAML (the package that provides yaml), then deploy again."
    ) in r.stdout + r.stderr
