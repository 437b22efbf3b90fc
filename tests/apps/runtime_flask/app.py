"""Test app for tests/test_runtime.py: a Flask (WSGI) web app and a function; prints while importing."""

from __future__ import annotations

from typing import Any

from flask import Flask, request

import osless

print("importing the flask test app")  # inspect must keep this off its JSON stdout

app = osless.App("runtime-flask")


@app.function(memory_mb=128, timeout_s=5)
def add(event: Any, ctx: osless.Context) -> int:
    return int(event["a"]) + int(event["b"])


@app.web(timeout_s=20)
def web() -> Flask:
    flask_app = Flask(__name__)

    @flask_app.route("/hello", methods=["GET", "POST"])
    def hello() -> dict[str, Any]:
        return {"hello": "flask", "method": request.method, "body": request.get_data(as_text=True)}

    return flask_app
