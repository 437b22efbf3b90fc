"""Who may invoke a function: tokens granted some functions, apps granted by the callee's owner,
public functions through the gateway. 401 without a token, 403 with one that lacks the right."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from osless.api.auth import TokenRecord
from osless.api.grants import MAX_GRANTS_PER_APP
from osless.api.routes.invoke import MAX_RESULT_BYTES
from tests.platform import Platform

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def orders(platform: Platform) -> dict[str, object]:
    return platform.deploy_warm(APPS / "orders")


@pytest.fixture(scope="module")
def shop(platform: Platform, orders: dict[str, object]) -> dict[str, object]:
    return platform.deploy_warm(APPS / "shop")


def _token(platform: Platform, *args: str) -> str:
    made = platform.cli_json("tokens", "create", "--role", "invoke", *args)
    return str(made["token"])


def _invoke(platform: Platform, app: str, fn: str, token: str | None, event: Any = None) -> httpx.Response:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.post(
        f"{platform.api}/v1/apps/{app}/functions/{fn}:invoke", json=event, headers=headers, timeout=60
    )


def _through_gateway(platform: Platform, app: str, fn: str, token: str | None) -> httpx.Response:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.post(f"{platform.gateway}/_functions/{app}/{fn}", json={}, headers=headers, timeout=60)


def test_a_token_invokes_the_functions_it_was_granted_and_no_other(
    platform: Platform, orders: dict[str, object]
) -> None:
    token = _token(platform, "--name", "ci", "--functions", "orders.quote")
    r = _invoke(platform, "orders", "quote", token, {"qty": 2})
    assert r.status_code == 200 and r.json() == {"price": 6}, r.text
    refused = _invoke(platform, "orders", "refund", token)
    assert refused.status_code == 403, refused.text
    error = refused.json()["error"]
    assert error["code"] == "not_allowed"
    assert "orders.refund" in error["message"] and "--functions orders.refund" in error["message"]
    none = _invoke(platform, "orders", "quote", None)
    assert none.status_code == 401 and none.json()["error"]["code"] == "unauthorized"
    # `APP.*`: every function of the app.
    every = _token(platform, "--functions", "orders.*")
    assert _invoke(platform, "orders", "refund", every).status_code == 200
    # The gateway's own path asks the API the same question, and says the same.
    assert _through_gateway(platform, "orders", "quote", token).status_code == 200
    at_gateway = _through_gateway(platform, "orders", "refund", token)
    assert at_gateway.status_code == 403 and at_gateway.json()["error"]["message"] == error["message"]
    unknown = _through_gateway(platform, "orders", "quote", "osl_made-up")
    assert unknown.status_code == 401 and "invalid token" in unknown.json()["error"]["message"]
    # A token sent that may not invoke at all is a 403 saying so, not a 401 asking for a token.
    reader = platform.cli_json("tokens", "create", "--role", "read")["token"]
    lacking = _through_gateway(platform, "orders", "quote", reader)
    assert lacking.status_code == 403 and "'invoke' permission" in lacking.json()["error"]["message"]
    other = _through_gateway(platform, "orders", "quote", _token(platform, "--app", "shop"))
    assert other.status_code == 403 and "limited to app 'shop'" in other.json()["error"]["message"]


def test_function_grants_are_for_invoke_tokens_named_app_dot_function(platform: Platform) -> None:
    r = platform.cli("tokens", "create", "--role", "deploy", "--functions", "orders.quote", check=False)
    assert r.returncode != 0 and "only an invoke token" in r.stdout + r.stderr
    r = platform.cli("tokens", "create", "--role", "invoke", "--functions", "orders", check=False)
    assert r.returncode != 0 and "functions" in r.stdout + r.stderr
    r = platform.cli(
        "tokens", "create", "--role", "invoke", "--app", "shop", "--functions", "orders.quote", check=False
    )
    assert r.returncode != 0 and "limited to app 'shop'" in r.stdout + r.stderr
    # A record made before grants existed reads as a token for any function.
    old = TokenRecord.model_validate_json(b'{"name": "ci", "role": "invoke", "app": null, "created_at": 1.0}')
    assert old.functions is None


def _buy(platform: Platform, target: str, fn: str = "buy") -> dict[str, Any]:
    status, body = platform.invoke("shop", fn, {"target": target, "event": {"qty": 5}})
    assert status == 200, body
    return dict(body)


def test_an_app_calls_another_s_function_only_once_the_callee_allows_it(
    platform: Platform, shop: dict[str, object]
) -> None:
    refused = _buy(platform, "orders.quote")["error"]
    assert refused["status"] == 403 and refused["code"] == "not_allowed", refused
    assert refused["message"] == (
        "app shop may not call orders.quote; grant it with `osless functions allow orders.quote --app shop`"
    )
    platform.cli("functions", "allow", "orders.quote", "--app", "shop")
    try:
        assert _buy(platform, "orders.quote") == {"result": {"price": 15}}
        assert _buy(platform, "orders.quote", "abuy") == {"result": {"price": 15}}
        # The grant is for that function alone.
        assert _buy(platform, "orders.refund")["error"]["code"] == "not_allowed"
        listed = platform.cli_json("functions", "grants", "orders")
        assert [(g["function"], g["caller"]) for g in listed] == [("quote", "shop")]
    finally:
        platform.cli("functions", "deny", "orders.quote", "--app", "shop")
    assert _buy(platform, "orders.quote")["error"]["code"] == "not_allowed"
    # Who may grant: the callee's deployers, not its invokers.
    r = httpx.put(
        f"{platform.api}/v1/apps/orders/functions/quote/callers/shop",
        headers={"authorization": f"Bearer {_token(platform)}"},
    )
    assert r.status_code == 403, r.text


def test_an_app_cannot_call_as_another_app(platform: Platform, shop: dict[str, object]) -> None:
    platform.cli("functions", "allow", "orders.*", "--app", "billing")
    try:
        # Headers that claim another identity, through the app's own egress: who calls is the socket's app.
        forged = platform.invoke(
            "shop",
            "forge",
            {
                "url": "http://orders.osless/__osless__/functions/quote",
                "headers": {"x-osless-caller-app": "billing", "x-osless-caller": "billing"},
            },
        )[1]
        assert forged["status"] == 403 and "app shop may not call orders.quote" in forged["body"], forged
        # The API's path for a node's egress proxy: an app's own token (OSLESS_TOKEN, which it
        # could leak) cannot use it, nor can anyone name an app the node does not run.
        node = platform.http("GET", "/v1/nodes").json()["items"][0]["name"]
        app_token = platform.invoke("shop", "leak")[1]
        path = f"/v1/nodes/{node}/apps/billing/invoke/orders/quote"
        as_app = httpx.post(platform.api + path, json={}, headers={"authorization": f"Bearer {app_token}"})
        assert as_app.status_code == 403, as_app.text
        not_here = platform.http("POST", path, json={})
        assert not_here.status_code == 403 and not_here.json()["error"]["code"] == "not_placed"
        # No header makes an identity at the gateway either: there is none it trusts.
        claimed = httpx.post(
            f"{platform.gateway}/_functions/orders/quote",
            json={},
            headers={"x-osless-caller-app": "billing", "x-osless-caller": "billing"},
        )
        assert claimed.status_code == 401, claimed.text
    finally:
        platform.cli("functions", "deny", "orders.*", "--app", "billing")


def test_a_public_function_answers_without_a_token_within_its_rate(
    platform: Platform, orders: dict[str, object]
) -> None:
    refused = _through_gateway(platform, "orders", "quote", None)
    assert refused.status_code == 401, refused.text
    assert "public=True" in refused.json()["error"]["message"]
    # One connection: one gateway process, whose bucket holds 20 calls and refills 10 a second.
    with httpx.Client(timeout=30) as client:
        statuses = []
        for _ in range(200):
            r = client.post(f"{platform.gateway}/_functions/orders/ping", json={})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert "retry" in r.json()["error"]["message"]
                break
    assert statuses[0] == 200 and r.json() != {} and statuses[-1] == 429, statuses
    assert statuses.count(200) >= 20, statuses


def test_grants_go_with_their_app(platform: Platform, orders: dict[str, object]) -> None:
    assert platform.http("POST", "/v1/apps", json={"name": "granting"}).status_code in (200, 201)
    platform.cli("functions", "allow", "granting.*", "--app", "shop")
    assert [g["caller"] for g in platform.cli_json("functions", "grants", "granting")] == ["shop"]
    unknown = platform.cli("functions", "allow", "nosuchapp.quote", "--app", "shop", check=False)
    assert unknown.returncode != 0 and "nosuchapp" in unknown.stdout + unknown.stderr
    platform.cli("functions", "allow", "orders.quote", "--app", "granting")  # as a caller too
    platform.cli("apps", "delete", "granting", "--yes")
    platform.http("POST", "/v1/apps", json={"name": "granting"})
    try:
        # A new app of the name starts with none, either way: the old one's grants are not its.
        assert platform.cli_json("functions", "grants", "granting") == []
        assert "granting" not in [g["caller"] for g in platform.cli_json("functions", "grants", "orders")]
    finally:
        platform.cli("apps", "delete", "granting", "--yes")


def test_a_result_past_the_limit_is_refused_not_held_whole(
    platform: Platform, orders: dict[str, object]
) -> None:
    # The API reads a result into memory to answer it (and an app's call of another's goes through
    # it): a function, or a hostile app, answering without end must not take the API's memory.
    token = _token(platform, "--functions", "orders.bulky")
    fits = _invoke(platform, "orders", "bulky", token, {"bytes": 1024})
    assert fits.status_code == 200 and fits.json() == "x" * 1024, fits.text
    over = _invoke(platform, "orders", "bulky", token, {"bytes": MAX_RESULT_BYTES + 1})
    assert over.status_code == 502, over.status_code
    error = over.json()["error"]
    assert error["code"] == "result_too_large" and "6 MiB" in error["message"], error
    assert len(over.content) < 4096
    # Lambda's Invoke API says it as Lambda does: the function's failure, not a 5xx boto3 would retry.
    as_lambda = httpx.post(
        f"{platform.api}/2015-03-31/functions/orders.bulky/invocations",
        json={"bytes": MAX_RESULT_BYTES + 1},
        headers={"x-amz-security-token": token},
        timeout=60,
    )
    assert as_lambda.status_code == 200 and as_lambda.headers["x-amz-function-error"] == "Unhandled"
    assert as_lambda.json()["errorType"] == "Function.ResponseSizeTooLarge", as_lambda.text
    # An app calling it gets the same refusal, through its node's egress.
    platform.cli("functions", "allow", "orders.bulky", "--app", "shop")
    try:
        status, body = platform.invoke(
            "shop", "buy", {"target": "orders.bulky", "event": {"bytes": MAX_RESULT_BYTES + 1}}
        )
        assert status == 200 and body["error"]["code"] == "result_too_large", str(body)[:300]
    finally:
        platform.cli("functions", "deny", "orders.bulky", "--app", "shop")


def test_an_app_holds_a_bounded_number_of_grants(platform: Platform) -> None:
    # Each grant is a key in the store: whoever may deploy an app must not grow it without end.
    assert platform.http("POST", "/v1/apps", json={"name": "crowded"}).status_code in (200, 201)
    try:
        # A token of its own (the shared admin token's rate is the other tests').
        made = platform.cli_json("tokens", "create", "--role", "deploy", "--app", "crowded")
        headers = {"authorization": f"Bearer {made['token']}"}
        with httpx.Client(base_url=platform.api, headers=headers, timeout=30) as client:
            for i in range(MAX_GRANTS_PER_APP):
                r = client.put(f"/v1/apps/crowded/functions/f{i}/callers/shop")
                if r.status_code == 429:  # this token's rate: wait it out
                    time.sleep(float(r.headers["retry-after"]))
                    r = client.put(f"/v1/apps/crowded/functions/f{i}/callers/shop")
                assert r.status_code == 200, r.text
            again = client.put("/v1/apps/crowded/functions/f0/callers/shop")  # held already: kept
            assert again.status_code == 200, again.text
            over = client.put("/v1/apps/crowded/functions/one_more/callers/shop")
            assert over.status_code == 409, over.text
            assert over.json()["error"]["code"] == "too_many_grants"
            assert "crowded.*" in over.json()["error"]["message"]
    finally:
        platform.cli("apps", "delete", "crowded", "--yes")


def test_a_public_function_s_failure_is_told_to_strangers_without_its_error(
    platform: Platform, orders: dict[str, object]
) -> None:
    # Its message and traceback (paths, code, what the exception says) are for its owner: a caller
    # without a token gets the request's id to ask them with, as from an http function.
    r = _through_gateway(platform, "orders", "fragile", None)
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "function_error" and "hunter2" not in r.text and "traceback" not in error
    assert r.headers["x-osless-request-id"] in error["message"] and "log" in error["message"]
    # A token's holder still reads the error, as with any function.
    token = _token(platform, "--functions", "orders.fragile")
    own = _through_gateway(platform, "orders", "fragile", token)
    assert own.status_code == 500 and "hunter2" in own.json()["error"]["message"], own.text
    assert "traceback" in own.json()["error"]
    # Which calls are public is the gateway's to say: no client's header says otherwise.
    for name in ("x-osless-public", "x_osless_public"):
        r = httpx.post(
            f"{platform.gateway}/_functions/orders/fragile", json={}, headers={name: "0"}, timeout=60
        )
        assert r.status_code == 500 and "hunter2" not in r.text, r.text


def test_tokens_for_an_app_go_with_it(platform: Platform) -> None:
    # A new app of a deleted one's name (another team's, say) must not be reached by the tokens made
    # for the old one: a deploy token limited to it, or an invoke token limited to its functions.
    assert platform.http("POST", "/v1/apps", json={"name": "reborn"}).status_code in (200, 201)
    deployer = str(platform.cli_json("tokens", "create", "--role", "deploy", "--app", "reborn")["token"])
    only = _token(platform, "--functions", "reborn.quote")
    mixed = _token(platform, "--functions", "reborn.*,orders.quote")

    def status(token: str, path: str) -> int:
        return httpx.get(platform.api + path, headers={"authorization": f"Bearer {token}"}).status_code

    def access(token: str, target: str) -> int:
        return status(token, "/v1/apps/{}/functions/{}/access".format(*target.split(".")))

    assert status(deployer, "/v1/apps/reborn") == 200
    assert access(only, "reborn.quote") == access(mixed, "reborn.quote") == 200
    platform.cli("apps", "delete", "reborn", "--yes")
    platform.http("POST", "/v1/apps", json={"name": "reborn"})
    try:
        time.sleep(1.1)  # what the API's cache of tokens held
        assert status(deployer, "/v1/apps/reborn") == 401
        assert access(only, "reborn.quote") == 401
        assert access(mixed, "reborn.quote") == 403  # the rest of what it was given stays
        assert access(mixed, "orders.quote") == 200
    finally:
        platform.cli("apps", "delete", "reborn", "--yes")


def test_a_request_id_an_app_makes_up_is_no_trouble(platform: Platform, shop: dict[str, object]) -> None:
    # The id travels on in headers to the API: one it could not carry (not ASCII) broke the call.
    platform.cli("functions", "allow", "orders.quote", "--app", "shop")
    try:
        for rid in ("\u00e9t\u00e9", "x" * 500, "ok-id.1"):
            forged = platform.invoke(
                "shop",
                "forge",
                {
                    "url": "http://orders.osless/__osless__/functions/quote",
                    "headers": {"x-osless-request-id": rid},
                },
            )[1]
            assert forged.get("status") == 200 and forged["body"] == {"price": 3}, (
                rid[:20],
                str(forged)[:600],
            )
    finally:
        platform.cli("functions", "deny", "orders.quote", "--app", "shop")


def test_a_request_id_a_caller_makes_up_is_no_trouble(platform: Platform, orders: dict[str, object]) -> None:
    # It goes on to the gateway in a header: one httpx cannot send (not ASCII) was a 500.
    for rid in (b"\xe9t\xe9", b"x" * 500):
        r = httpx.post(
            f"{platform.api}/v1/apps/orders/functions/quote:invoke",
            json={},
            headers=[(b"authorization", f"Bearer {platform.token}".encode()), (b"x-osless-request-id", rid)],
            timeout=60,
        )
        assert r.status_code == 200 and r.json() == {"price": 3}, r.text[:300]
