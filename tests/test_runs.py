"""One-off commands (`osless run`, `WS /v1/apps/{app}/runs`) and release steps (`App(release=[...])`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def oneoff(platform: Platform) -> Iterator[dict[str, Any]]:
    deployed = platform.deploy(APPS / "oneoff")
    platform.cli("config", "set", "oneoff", "greeting=bonjour", "password=s3cret")
    yield deployed
    platform.http("DELETE", "/v1/apps/oneoff")


def test_run_streams_output_and_exits_with_the_commands_code(
    platform: Platform, oneoff: dict[str, Any]
) -> None:
    r = platform.cli(
        "run", "oneoff", "--", "python", "-c", "import sys; print('hi'); sys.exit(3)", check=False
    )
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert r.stdout == "hi\n"


def test_run_forwards_stdin_and_keeps_stderr_apart(platform: Platform, oneoff: dict[str, Any]) -> None:
    r = platform.cli("run", "oneoff", "--", "python", "tools.py", "echo", input="yes\n")
    assert r.stdout == "got yes\n"
    assert r.stderr == "to stderr\n"


def test_run_sees_the_apps_config_and_secrets(platform: Platform, oneoff: dict[str, Any]) -> None:
    r = platform.cli("run", "oneoff", "--", "python", "tools.py", "settings")
    assert r.stdout.split() == ["bonjour", "s3cret", "oneoff", str(oneoff["release"])]
