"""A caller's own deadline (`x-osless-deadline`, passed through by the gateway) and what it costs.

Finding A4 (weak): a function that ran past a deadline the caller set had its instance replaced,
even when the handler was async and was cancelled cleanly (nothing ran on). So any token that may
invoke (role invoke, one app) could fork a new instance and retire the old one, warm state and all,
with each call. Now only a handler still running past its function's own timeout has its instance
replaced.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.attack.helpers import make_token, ready_instance, write_app
from tests.platform import Platform

NAPPER = """\
import asyncio
import os

import osless

app = osless.App("napper")


@app.function(timeout_s=30)
async def nap(event, ctx):
    await asyncio.sleep(0.5)
    return os.getpid()
"""


def test_a_callers_short_deadline_does_not_replace_the_instance(platform: Platform, tmp_path: Path) -> None:
    platform.deploy(write_app(tmp_path / "napper", NAPPER))
    token = make_token(platform, "invoke", app="napper")["token"]
    url = f"{platform.gateway}/_functions/napper/nap"
    auth = {"authorization": f"Bearer {token}"}
    assert httpx.post(url, headers=auth, timeout=30).status_code == 200
    before = ready_instance(platform, "napper")["status"]["restarts"]
    for _ in range(3):
        r = httpx.post(url, headers={**auth, "x-osless-deadline": str(time.time() + 0.05)}, timeout=30)
        assert r.status_code == 504, r.text
        time.sleep(1.0)  # the replacement, if any, is under way
    after = ready_instance(platform, "napper")["status"]["restarts"]
    assert after == before, f"3 calls with a short deadline replaced the instance {after - before} times"
