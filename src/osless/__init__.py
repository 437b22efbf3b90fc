"""osless: run Python apps without an operating system to manage.

App code imports this package: `app = osless.App("shop")`. The server side lives in the
subpackages (`api`, `store`, `node`, `gateway`, `build`, `controllers`) and is never imported here,
so that an app's import stays small.
"""

from __future__ import annotations

from osless.sdk import App, Context, OslessError, UsageError

__all__ = ["App", "Context", "OslessError", "UsageError"]
__version__ = "0.1.0"
