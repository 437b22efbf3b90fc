"""osless: run Python apps without an operating system to manage.

App code imports this package: `app = osless.App("shop")`. The server side lives in the
subpackages (`api`, `store`, `node`, `gateway`, `build`, `controllers`) and is never imported here,
so that an app's import stays small.
"""

from __future__ import annotations

from osless.sdk import (
    JSON,
    App,
    ConfigError,
    Context,
    Field,
    OslessError,
    Secret,
    Service,
    Settings,
    UsageError,
    Volume,
    service,
)

__all__ = [
    "JSON",
    "App",
    "ConfigError",
    "Context",
    "Field",
    "OslessError",
    "Secret",
    "Service",
    "Settings",
    "UsageError",
    "Volume",
    "service",
]
__version__ = "0.1.0"
