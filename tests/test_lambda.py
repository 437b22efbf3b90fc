"""Lambda code unchanged: AWS's own sample handlers, called through boto3's `lambda` client (the
Invoke API on the API's address) and over HTTP as Function URL events (`@app.function(http=True)`)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import httpx
import pytest

from tests.platform import Platform

APPS = Path(__file__).parent / "apps"
APP = "lambda-samples"


@pytest.fixture(scope="module")
def samples(platform: Platform) -> dict[str, Any]:
    """tests/apps/lambda_samples, deployed once and kept warm."""
    return platform.deploy_warm(APPS / "lambda_samples")


def token(platform: Platform, role: str, app: str | None = None, functions: list[str] | None = None) -> str:
    body: dict[str, Any] = {"role": role, "name": f"lambda-{role}-{uuid.uuid4().hex[:8]}"}
    if app is not None:
        body["app"] = app
    if functions is not None:
        body["functions"] = functions
    r = platform.http("POST", "/v1/tokens", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def lambda_client(platform: Platform, session_token: str | None) -> Any:
    """boto3's own client, as a user points it at osless: the token as the session token."""
    return boto3.client(
        "lambda",
        endpoint_url=platform.api,
        region_name="osless",
        aws_access_key_id="osless",
        aws_secret_access_key="osless",
        aws_session_token=session_token,
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )


def payload(resp: dict[str, Any]) -> Any:
    return json.loads(resp["Payload"].read())


def test_boto3_invokes_aws_samples_unchanged(platform: Platform, samples: dict[str, Any]) -> None:
    client = lambda_client(platform, token(platform, "invoke", APP))
    version = str(samples["release"])

    resp = client.invoke(FunctionName=f"{APP}.hello", Payload=json.dumps({"key1": "value1"}))
    assert resp["StatusCode"] == 200
    assert "FunctionError" not in resp
    assert resp["ExecutedVersion"] == version
    assert payload(resp) == {"statusCode": 200, "body": '"Hello from Lambda!"'}

    # The developer guide's context sample reads every attribute (and sleeps 1 s); it returns None.
    resp = client.invoke(FunctionName=f"{APP}.context_sample")
    assert (resp["StatusCode"], "FunctionError" in resp, payload(resp)) == (200, False, None)

    # An ARN naming it, and a Qualifier of the current release or $LATEST, reach the same function.
    arn = f"arn:aws:lambda:osless:000000000000:function:{APP}.whoami"
    for name, qualifier in ((arn, version), (f"{APP}.whoami", "$LATEST"), (f"{arn}:{version}", None)):
        extra = {"Qualifier": qualifier} if qualifier else {}
        resp = client.invoke(FunctionName=name, Payload=b'{"n": 1}', **extra)
        ctx = payload(resp)
        assert ctx["event"] == {"n": 1}
        assert ctx["aws_request_id"] == resp["ResponseMetadata"]["RequestId"] != ""
        assert ctx["function_name"] == f"{APP}.whoami"
        assert ctx["function_version"] == version
        assert ctx["memory_limit_in_mb"] == 192
        assert 5000 < ctx["remaining"] <= 7000
        assert ctx["invoked_function_arn"] == arn
        assert ctx["log_group_name"] == f"/osless/{APP}"
        assert ctx["log_stream_name"].startswith(f"{APP}-")
        assert ctx["identity"] is None and ctx["client_context"] is None

    # A dry run checks, and runs nothing.
    resp = client.invoke(FunctionName=f"{APP}.fails", InvocationType="DryRun")
    assert resp["StatusCode"] == 204


def test_boto3_sees_a_raising_handler_as_lambda_shows_it(platform: Platform, samples: dict[str, Any]) -> None:
    client = lambda_client(platform, token(platform, "invoke", APP))
    resp = client.invoke(FunctionName=f"{APP}.fails", Payload=b'"q1"')
    assert resp["StatusCode"] == 200
    assert resp["FunctionError"] == "Unhandled"
    error = payload(resp)
    assert error["errorType"] == "ValueError"
    assert error["errorMessage"] == "no quote for 'q1'"
    assert any("raise ValueError" in frame for frame in error["stackTrace"]), error
    # Past its timeout, and a result JSON cannot carry: the function's failures too, named as Lambda's.
    for name, kind in (
        ("slow", "Sandbox.Timedout"),
        ("unsendable", "Runtime.MarshalError"),
        ("exits", "Runtime.ExitError"),  # its instance died with the call: never sent again by boto3
    ):
        resp = client.invoke(FunctionName=f"{APP}.{name}")
        assert (resp["StatusCode"], resp["FunctionError"]) == (200, "Unhandled")
        assert payload(resp)["errorType"] == kind


def test_boto3_errors_are_lambdas(platform: Platform, samples: dict[str, Any]) -> None:
    client = lambda_client(platform, token(platform, "invoke"))
    for name in (f"{APP}.nope", "nope.hello", "no-dot", f"arn:aws:lambda:osless:0:layer:{APP}.hello"):
        with pytest.raises(client.exceptions.ResourceNotFoundException):
            client.invoke(FunctionName=name, Payload=b"{}")
    with pytest.raises(client.exceptions.ResourceNotFoundException, match="current release only"):
        client.invoke(FunctionName=f"{APP}.hello", Qualifier="999")
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        client.invoke(FunctionName=f"{APP}.hello", Payload=b"{not json")
    # An async one is checked as a sync one before it is accepted (its 202: tests/test_invocations.py).
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        client.invoke(FunctionName=f"{APP}.hello", Payload=b"{not json", InvocationType="Event")


def test_boto3_without_the_right_token_is_refused(platform: Platform, samples: dict[str, Any]) -> None:
    def code(session_token: str | None) -> tuple[int, str]:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            lambda_client(platform, session_token).invoke(FunctionName=f"{APP}.hello")
        return e.value.response["ResponseMetadata"]["HTTPStatusCode"], e.value.response["Error"]["Code"]

    assert code(None) == (401, "UnrecognizedClientException")
    assert code("osl_made-up") == (401, "UnrecognizedClientException")
    assert code(token(platform, "read")) == (403, "AccessDeniedException")
    assert code(token(platform, "invoke", "hello")) == (403, "AccessDeniedException")  # another app's
    # A token limited to other functions (`--functions`) is held to them here too.
    assert code(token(platform, "invoke", APP, [f"{APP}.other"])) == (403, "AccessDeniedException")
    # The route is the API's like any other: the same token as a bearer token works too.
    r = httpx.post(
        f"{platform.api}/2015-03-31/functions/{APP}.hello/invocations",
        headers={"authorization": f"Bearer {token(platform, 'invoke', APP)}"},
        content=b"{}",
    )
    assert (r.status_code, r.json()["statusCode"]) == (200, 200)
    # Audited as an invoke of the app (the name holds the app, not the path).
    audit = platform.http("GET", "/v1/audit", params={"app": APP}).json()["items"]
    assert any("/2015-03-31/functions/" in e["path"] for e in audit), audit


def test_http_reaches_an_event_handler_as_a_function_url(platform: Platform, samples: dict[str, Any]) -> None:
    base = f"{platform.gateway}/{APP}/_http"
    # No token: an http function is public, as a Function URL with auth NONE is.
    r = httpx.get(f"{base}/hello/")
    assert (r.status_code, r.json(), r.headers["content-type"]) == (
        200,
        "Hello from Lambda!",
        "application/json",
    )

    started = time.time()
    r = httpx.get(
        f"{base}/echo/a/b%20c?x=1&x=2&y=",
        headers={"cookie": "s=1; t=2", "x-many": "one", "user-agent": "tester/1"},
    )
    assert r.status_code == 200, r.text
    event = r.json()
    assert event["version"] == "2.0" and event["routeKey"] == "$default"
    assert event["rawPath"] == "/a/b%20c"
    assert event["rawQueryString"] == "x=1&x=2&y="
    assert event["queryStringParameters"] == {"x": "1,2", "y": ""}
    assert event["cookies"] == ["s=1", "t=2"]
    assert "cookie" not in event["headers"] and event["headers"]["x-many"] == "one"
    http = event["requestContext"]["http"]
    assert http == {
        "method": "GET",
        "path": "/a/b%20c",
        "protocol": "HTTP/1.1",
        "sourceIp": "127.0.0.1",
        "userAgent": "tester/1",
    }
    assert started - 1 <= event["requestContext"]["timeEpoch"] / 1000 <= time.time() + 1
    assert event["requestContext"]["requestId"] == r.headers["x-osless-request-id"]
    assert "body" not in event and event["isBase64Encoded"] is False

    # A text body as text, any other in base64.
    r = httpx.post(f"{base}/echo/", content=b'{"order": 7}', headers={"content-type": "application/json"})
    assert (r.json()["body"], r.json()["isBase64Encoded"], r.json()["requestContext"]["http"]["method"]) == (
        '{"order": 7}',
        False,
        "POST",
    )
    blob = bytes(range(256))
    r = httpx.post(f"{base}/echo/", content=blob, headers={"content-type": "application/octet-stream"})
    assert (base64.b64decode(r.json()["body"]), r.json()["isBase64Encoded"]) == (blob, True)

    # A binary answer: isBase64Encoded, its status, headers and cookies.
    r = httpx.get(f"{base}/echo/binary")
    assert r.status_code == 201
    assert r.content == b"\x89PNG\r\n\x1a\n\x00\xff"
    assert (r.headers["content-type"], r.headers["x-sample"]) == ("image/png", "yes")
    assert r.headers.get_list("set-cookie") == ["a=1; Path=/", "b=2"]
    # A bare dict is a 200 JSON answer.
    r = httpx.get(f"{base}/echo/plain")
    assert (r.status_code, r.json()) == (200, {"just": "a dict"})

    # Two http functions and no web app: the app's own paths say where they are.
    r = httpx.get(f"{platform.gateway}/{APP}/elsewhere")
    assert r.status_code == 404 and f"/{APP}/_http/echo/" in r.json()["error"]["message"]
    # Only http=True functions are reachable so; the others stay behind a token.
    assert httpx.get(f"{base}/fails/").status_code == 404


def test_a_qualifier_is_checked_before_it_is_said_back(platform: Platform, samples: dict[str, Any]) -> None:
    # Said back in the error, a qualifier of any length and bytes would make the answer as long.
    headers = {"x-amz-security-token": token(platform, "invoke")}
    for name, query in ((f"{APP}.hello:{'v' * 5000}", ""), (f"{APP}.hello", "?Qualifier=" + "%0A" * 3000)):
        r = httpx.post(f"{platform.api}/2015-03-31/functions/{name}/invocations{query}", headers=headers)
        assert r.status_code == 400 and r.headers["x-amzn-errortype"] == "InvalidParameterValueException"
        assert r.json()["error"]["code"] == "bad_qualifier" and len(r.content) < 1024, r.text[:300]
    ok = httpx.post(
        f"{platform.api}/2015-03-31/functions/{APP}.hello:$LATEST/invocations", headers=headers, json={}
    )
    assert ok.status_code == 200, ok.text
