"""Errors an app's own code may see from the SDK."""

from __future__ import annotations

import json

__all__ = ["ConfigError", "OslessError", "UsageError", "error_parts"]


class OslessError(Exception):
    """Base of every error osless raises into app code."""


class UsageError(OslessError):
    """The SDK was used wrongly; the message says how to fix it."""


class ConfigError(OslessError):
    """A config key the app reads has no usable value; the message says how to set it."""


def error_parts(status: int, data: bytes, doing: str) -> tuple[str, str]:
    """(code, message) of the platform's error answer to `doing` (a function call, a send): its error
    body's, or the answer's text when it has none."""
    try:
        err = json.loads(data)["error"]
        return str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        text = data.decode("utf-8", "replace").strip()[:500]
        return "http_error", f"{doing}: HTTP {status}: {text}"
