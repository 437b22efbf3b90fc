"""The `ctx` a function receives: who is asking, and how long it has left.

It also answers as AWS Lambda's Python context does (`aws_request_id`, `function_name`,
`get_remaining_time_in_millis()`...), so a handler written for Lambda runs unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ARN_PREFIX", "Context"]

# Lambda's ARNs name a region and a 12-digit account; osless has neither, so both are fixed.
ARN_PREFIX = "arn:aws:lambda:osless:000000000000:function:"


@dataclass
class Context:
    """Per-invocation context: request id, app and function name, deadline and a logger."""

    request_id: str
    app: str
    function: str
    deadline: float  # epoch seconds
    release: int | None = None  # the release serving the call (None outside a platform instance)
    memory_mb: int = 256  # what the function declared (`@app.function(memory_mb=...)`)
    instance: str = ""  # the instance serving the call
    log: logging.Logger = field(init=False, repr=False)
    # Lambda's: who called from a mobile SDK, and the client's context. osless has neither.
    identity: Any = field(default=None, init=False, repr=False)
    client_context: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = logging.getLogger(f"osless.app.{self.app}.{self.function}")

    def remaining_ms(self) -> int:
        """Milliseconds left before the platform ends this invocation with a timeout."""
        return max(0, int((self.deadline - time.time()) * 1000))

    # -- AWS Lambda's names for the same things -------------------------------------------------------

    @property
    def aws_request_id(self) -> str:
        return self.request_id

    @property
    def function_name(self) -> str:
        """`APP.FUNCTION`: the name the Lambda Invoke API takes (`FunctionName="shop.quote"`)."""
        return f"{self.app}.{self.function}"

    @property
    def function_version(self) -> str:
        """The release number ("3"); "$LATEST" when not known (a handler called outside an instance)."""
        return "$LATEST" if self.release is None else str(self.release)

    @property
    def memory_limit_in_mb(self) -> int:
        return self.memory_mb

    @property
    def invoked_function_arn(self) -> str:
        return ARN_PREFIX + self.function_name

    @property
    def log_group_name(self) -> str:
        return f"/osless/{self.app}"

    @property
    def log_stream_name(self) -> str:
        """The instance whose log holds what the call printed (`osless logs APP --instance ...`)."""
        return self.instance

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms()
