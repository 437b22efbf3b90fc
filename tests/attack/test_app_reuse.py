"""Deleting an app and making another of the same name: the new one must get nothing of the old.

Finding A2 (weak): the logs. `GET /v1/apps/{app}/logs` reads every file in `logs/apps/{app}/`, and
the files of a deleted app stay there until the collector's `instance_logs_days` (7 days) pass. A
new app of the same name (another team's, with a token scoped to it) reads the old app's output.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.attack.helpers import make_token, write_app
from tests.platform import Platform

OLD = """\
import osless

app = osless.App("reused")
print("OLD-APP-SECRET: card 4111111111111111", flush=True)


@app.function()
def ping(event, ctx):
    return "pong"
"""


def test_a_new_app_of_a_deleted_apps_name_reads_none_of_its_logs(platform: Platform, tmp_path: Path) -> None:
    platform.deploy(write_app(tmp_path / "old", OLD))
    assert platform.invoke("reused", "ping") == (200, "pong")
    assert platform.http("DELETE", "/v1/apps/reused").status_code == 204
    assert platform.http("POST", "/v1/apps", json={"name": "reused"}).status_code == 201
    # The new app's owner, with a debug token limited to it.
    token = make_token(platform, "debug", app="reused")["token"]
    r = httpx.get(
        f"{platform.api}/v1/apps/reused/logs",
        params={"tail": 1000},
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    leaked = [line for line in r.text.splitlines() if "OLD-APP-SECRET" in line]
    assert not leaked, f"the new app reads the old app's logs: {leaked[:2]}"
