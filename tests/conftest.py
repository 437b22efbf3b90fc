from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.platform import EXAMPLES, Platform

COLLECTOR_HOST = "127.0.0.77"


@pytest.fixture(scope="session")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """One running platform, shared by the tests that only add to it. Its apps may reach 127.0.0.77 if
    they list it (where tests/test_traces.py runs its OTLP collector), as an operator would allow a
    collector's address; nothing else of this host. Every trace a gateway starts is recorded
    (`--trace-sample 1`), so a test's lone request has its spans whatever ran in the same second."""
    root = tmp_path_factory.mktemp("platform")
    args = ["--egress-allow", f"{COLLECTOR_HOST}/32", "--trace-sample", "1"]
    p = Platform(root / "data", args=args).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def hello(platform: Platform) -> dict[str, object]:
    """examples/hello, deployed once."""
    return platform.deploy_warm(EXAMPLES / "hello")


@pytest.fixture
def own_platform(tmp_path: Path) -> Iterator[Platform]:
    """A platform of the test's own, for tests that stop or kill it."""
    p = Platform(tmp_path / "data").start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def flask_demo(platform: Platform) -> dict[str, object]:
    """examples/flask, deployed once."""
    return platform.deploy_warm(EXAMPLES / "flask")


@pytest.fixture(scope="session")
def inspector(platform: Platform) -> dict[str, object]:
    """tests/apps/inspector (Flask: what a WSGI app is given), deployed once."""
    return platform.deploy_warm(Path(__file__).parent / "apps" / "inspector")
