"""runtime/function_url.py and its use by the instance: web requests to `@app.function(http=True)`
handlers, served by a real `Instance` in this process (the end-to-end path is tests/test_lambda.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

import osless
from osless.runtime.function_url import BadAnswer, answer_of, event_of
from osless.runtime.instance import create_instance


def serve(app: osless.App, method: str, path: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_instance(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.localhost") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def test_an_app_with_one_http_function_and_no_web_app_takes_every_path() -> None:
    app = osless.App("shop")

    @app.function(http=True)
    def quote(event: Any, context: Any) -> dict[str, Any]:
        return {"statusCode": 200, "body": json.dumps([event["rawPath"], context.function_name])}

    r = serve(app, "GET", "/items/7?x=1")
    assert (r.status_code, r.json()) == (200, ["/items/7", "shop.quote"])
    r = serve(app, "GET", "/_http/quote/items")
    assert (r.status_code, r.json()) == (200, ["/items", "shop.quote"])


def test_a_web_app_keeps_its_paths_beside_http_functions() -> None:
    app = osless.App("shop")

    @app.function(http=True)
    def quote(event: Any, context: Any) -> str:
        return "from the function"

    @app.web()
    def web() -> Any:
        async def asgi(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": scope["path"].encode()})

        return asgi

    assert serve(app, "GET", "/items").text == "/items"
    assert serve(app, "GET", "/_http/other/").text == "/_http/other/"  # not an http function's
    r = serve(app, "GET", "/_http/quote/")
    assert (r.text, r.headers["content-type"]) == ("from the function", "application/json")


def test_a_raising_http_function_answers_502_and_keeps_its_error_to_the_log(
    capfd: pytest.CaptureFixture[str],
) -> None:
    app = osless.App("shop")

    @app.function(http=True)
    def quote(event: Any, context: Any) -> None:
        raise RuntimeError("the database password is hunter2")

    r = serve(app, "GET", "/")
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "function_error"
    assert "hunter2" not in r.text  # the caller has no token: nothing of the error reaches it
    assert "hunter2" in capfd.readouterr().err


def test_an_answer_that_is_not_http_is_a_502_saying_why() -> None:
    app = osless.App("shop")

    @app.function(http=True)
    def quote(event: Any, context: Any) -> dict[str, Any]:
        return {"statusCode": 200, "headers": {"x-a": "1\r\nset-cookie: stolen=1"}, "body": "x"}

    r = serve(app, "GET", "/")
    assert r.status_code == 502 and "line break" in r.json()["error"]["message"]
    assert "stolen" not in r.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"statusCode": 99}, "HTTP status"),
        ({"statusCode": 101}, "HTTP status"),
        ({"statusCode": True}, "HTTP status"),
        ({"statusCode": "2\u00b200"}, "HTTP status"),  # '²': isdigit() holds, int() refuses
        ({"statusCode": "2" * 5000}, "HTTP status"),  # past int()'s limit on digits
        ({"statusCode": 200, "body": {"a": 1}}, "json.dumps"),
        ({"statusCode": 200, "body": "@@", "isBase64Encoded": True}, "not base64"),
        ({"statusCode": 200, "headers": {"bad name": "v"}}, "field name"),
        ({"statusCode": 200, "headers": {"x": ["a", "b"]}}, "give a string"),
        ({"statusCode": 200, "headers": {"x": "é€"}}, "Latin-1"),
        ({"statusCode": 200, "cookies": "a=1"}, "list"),
        ({"n": float("nan")}, "JSON"),
    ],
)
def test_answers_that_cannot_be_http_are_refused(result: Any, problem: str) -> None:
    with pytest.raises(BadAnswer, match=problem):
        answer_of(result)


def test_answers_become_http() -> None:
    a = answer_of({"statusCode": "404", "headers": {"Content-Length": "1", "X-On": True}, "body": "gone"})
    assert (a.status, a.body) == (404, b"gone")
    assert a.headers == [(b"x-on", b"true"), (b"content-type", b"application/json")]  # its length is ours
    assert answer_of("hi").body == b"hi"
    assert answer_of([1, None]).body == b"[1, null]"
    assert answer_of({"statusCode": 204, "body": "dropped"}).body == b""


def test_events_join_repeated_headers_and_parameters() -> None:
    event = event_of(
        method="PUT",
        raw_path="/",
        query=b"a=1&a=2",
        headers=[(b"X-Tag", b"a"), (b"x-tag", b"b"), (b"content-type", b"text/plain; charset=latin-1")],
        body=b"caf\xe9",  # not UTF-8: in base64, whatever its type says
        http_version="1.0",
        source_ip="10.0.0.1",
        request_id="r1",
        app="shop",
        now=0.0,
    )
    assert event["headers"] == {"x-tag": "a,b", "content-type": "text/plain; charset=latin-1"}
    assert event["queryStringParameters"] == {"a": "1,2"}
    assert (event["body"], event["isBase64Encoded"]) == ("Y2Fm6Q==", True)
    assert event["requestContext"]["time"] == "01/Jan/1970:00:00:00 +0000"
    assert event["requestContext"]["http"]["protocol"] == "HTTP/1.0"
