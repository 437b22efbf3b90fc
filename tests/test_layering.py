"""The walls between parts, read from the imports: what the architecture page promises."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "osless"
SERVER_SIDE = {
    "api",
    "store",
    "node",
    "gateway",
    "builder",
    "images",
    "controllers",
    "client",
    "cli",
    "server",
}


def imports_of(package: str) -> dict[str, set[str]]:
    """module path -> the osless subpackages it imports."""
    found: dict[str, set[str]] = {}
    files = (
        [SRC / f"{package}.py"] if (SRC / f"{package}.py").exists() else sorted((SRC / package).rglob("*.py"))
    )
    for path in files:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("osless."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("osless."))
        found[str(path.relative_to(SRC))] = names
    return found


def test_only_the_api_and_its_host_touch_the_store() -> None:
    for package in SERVER_SIDE - {"api", "store", "server"}:
        for module, names in imports_of(package).items():
            assert "store" not in names, f"{module} imports osless.store: reach state through the API"


def test_runtime_and_sdk_import_nothing_server_side() -> None:
    for package in ("runtime", "sdk"):
        for module, names in imports_of(package).items():
            assert not names & SERVER_SIDE, f"{module} imports {names & SERVER_SIDE}"


def test_cli_reaches_the_platform_over_http_only() -> None:
    # builder.source packs the upload; `up` hosts the server; `doctor` probes this very host;
    # errors: the client's ApiError, caught without importing the client (and httpx) up front
    allowed = {"cli", "client", "errors", "builder", "server", "node"}
    for module, names in imports_of("cli").items():
        assert names <= allowed, f"{module} imports {names - allowed}"
    main = (SRC / "cli" / "main.py").read_text()
    head = main.split("\n@app.command")[0]  # module level: what every command pays for
    assert "osless.server" not in head and "osless.node" not in head


def test_app_import_stays_small() -> None:
    import subprocess
    import sys

    heavy = "('fastapi', 'httpx', 'uvicorn')"
    code = f"import osless, sys; print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_imports_only_what_a_command_needs() -> None:
    import subprocess
    import sys

    # Each command must answer in well under 150 ms, and most of a short command's time is its
    # imports: the CLI's main module pays for neither the SDK (pydantic), the informers nor httpx;
    # a command that talks to the API imports the client when it runs.
    heavy = "('pydantic', 'osless.sdk', 'osless.client', 'httpx', 'fastapi')"
    code = f"import osless.cli.main, sys; print(sorted(m for m in sys.modules if m.startswith({heavy})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_contracts_and_the_controllers_import_no_fastapi() -> None:
    import subprocess
    import sys

    # The typed resources are read by processes that are clients of the API: they pay for pydantic,
    # never for the server.
    mods, server = "osless.contracts, osless.client, osless.controllers", "('fastapi', 'osless.api')"
    code = f"import {mods}, sys; print(sorted(m for m in sys.modules if m.startswith({server})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert imports_of("contracts") == {"contracts.py": set()}
