"""What app code imports. Nothing here reaches the server side of osless."""

from __future__ import annotations

from osless.sdk.app import App, FunctionSpec, WebSpec
from osless.sdk.context import Context
from osless.sdk.errors import OslessError, UsageError

__all__ = ["App", "Context", "FunctionSpec", "OslessError", "UsageError", "WebSpec"]
