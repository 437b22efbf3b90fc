"""Function calls through the gateway: `POST /_functions/{app}/{fn}` with an API token.

Finding A3 (weak): the gateway asked the API who a token is (`/v1/whoami`) and kept a yes for 60 s,
so a revoked token kept calling functions there for up to a minute. It keeps one for a second now,
as the API itself does for a revocation made elsewhere.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.attack.helpers import make_token
from tests.platform import Platform


def test_a_revoked_token_stops_calling_functions_through_the_gateway(
    platform: Platform, hello: dict[str, Any]
) -> None:
    made = make_token(platform, "invoke", app="hello")
    auth = {"authorization": f"Bearer {made['token']}"}
    gateway = f"{platform.gateway}/_functions/hello/greet"
    assert httpx.post(gateway, json={"name": "x"}, headers=auth, timeout=30).status_code == 200
    assert platform.http("DELETE", f"/v1/tokens/{made['id']}").status_code == 204
    api = httpx.post(f"{platform.api}/v1/apps/hello/functions/greet:invoke", headers=auth, timeout=30)
    assert api.status_code == 401  # the API stops it at once
    time.sleep(1.2)  # the gateway asks the API again past a second, as the API asks its store
    after = httpx.post(gateway, json={"name": "x"}, headers=auth, timeout=30)
    assert after.status_code == 401, f"the gateway still runs the function for a revoked token: {after.text}"
