"""Errors an app's own code may see from the SDK."""

from __future__ import annotations

__all__ = ["ConfigError", "OslessError", "UsageError"]


class OslessError(Exception):
    """Base of every error osless raises into app code."""


class UsageError(OslessError):
    """The SDK was used wrongly; the message says how to fix it."""


class ConfigError(OslessError):
    """A config key the app reads has no usable value; the message says how to set it."""
