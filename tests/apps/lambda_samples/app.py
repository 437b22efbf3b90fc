"""Test app for tests/test_lambda.py: handlers from AWS's own samples, registered unchanged
(lambda_function.py is the Lambda console's Python blueprint, context_sample.py the context sample
of the Lambda developer guide, both only formatted by ruff), and a few of its own to look at what
Lambda code is given."""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any

import context_sample
import lambda_function

import osless

app = osless.App("lambda-samples")

app.function(name="hello", http=True)(lambda_function.lambda_handler)
app.function(name="context_sample", memory_mb=128, timeout_s=5)(context_sample.lambda_handler)


@app.function(memory_mb=192, timeout_s=7)
def whoami(event: Any, context: Any) -> dict[str, Any]:
    return {
        "aws_request_id": context.aws_request_id,
        "function_name": context.function_name,
        "function_version": context.function_version,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "remaining": context.get_remaining_time_in_millis(),
        "invoked_function_arn": context.invoked_function_arn,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "identity": context.identity,
        "client_context": context.client_context,
        "event": event,
    }


@app.function()
def fails(event: Any, context: Any) -> None:
    raise ValueError(f"no quote for {event!r}")


@app.function(timeout_s=0.5)
def slow(event: Any, context: Any) -> None:
    time.sleep(0.8)  # done before the instance would be replaced for running on (0.5 s after)


@app.function()
def unsendable(event: Any, context: Any) -> set[int]:
    return {1, 2}


@app.function()
def exits(event: Any, context: Any) -> None:
    os._exit(3)


@app.function(http=True)
def echo(event: Any, context: Any) -> Any:
    """Answers what a Function URL event held; a PNG's first bytes for /binary, a bare dict for /plain."""
    if event["rawPath"] == "/binary":
        png = b"\x89PNG\r\n\x1a\n\x00\xff"
        return {
            "statusCode": 201,
            "headers": {"content-type": "image/png", "x-sample": "yes"},
            "cookies": ["a=1; Path=/", "b=2"],
            "body": base64.b64encode(png).decode(),
            "isBase64Encoded": True,
        }
    if event["rawPath"] == "/plain":
        return {"just": "a dict"}
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
