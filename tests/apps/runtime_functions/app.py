"""Test app for tests/test_runtime.py: functions only, no web app."""

from __future__ import annotations

from typing import Any

import osless

app = osless.App("runtime-functions")


@app.function()
def ping(event: Any, ctx: osless.Context) -> str:
    return "pong"
