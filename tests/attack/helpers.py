"""What the attack reproductions share: writing a hostile app, deploying it and waiting for the outcome."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

from tests.platform import Platform


def write_app(folder: Path, source: str, **files: str) -> Path:
    """An app folder with `app.py` and any other files (`files` maps relative paths to their text)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(textwrap.dedent(source))
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return folder


def deploy_outcome(platform: Platform, folder: Path, timeout: float = 120) -> dict[str, Any]:
    """Upload `folder` and wait for its deploy to end, whatever the end: the deploy record."""
    deploy = platform.upload(folder)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record: dict[str, Any] = platform.http("GET", f"/v1/deploys/{deploy['id']}").json()
        if record["status"] not in ("queued", "building"):
            return record
        time.sleep(0.2)
    raise AssertionError(f"deploy {deploy['id']} still building after {timeout}s")


def ready_instance(platform: Platform, app: str, timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = platform.wait_for(
        lambda: next((i for i in platform.instances(app) if i["status"]["phase"] == "ready"), None),
        timeout=timeout,
        what=f"a ready instance of {app}",
    )
    return found


def make_token(platform: Platform, role: str, app: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"role": role, "name": f"attack-{role}"}
    if app is not None:
        body["app"] = app
    r = platform.http("POST", "/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made
