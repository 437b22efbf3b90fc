"""osless: run Python apps without an operating system to manage.

App code imports this package: `app = osless.App("shop")`. The server side lives in the
subpackages (`api`, `store`, `node`, `gateway`, `build`, `controllers`) and is never imported here,
so that an app's import stays small. The SDK itself is imported on first use of one of its names
(PEP 562), so that `import osless.cli.main` does not pay for pydantic: a CLI command must answer fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from osless.sdk import (
        JSON,
        App,
        ConfigError,
        Context,
        Field,
        FunctionCallError,
        OslessError,
        RemoteFunction,
        Secret,
        Service,
        Settings,
        UsageError,
        Volume,
        function,
        service,
    )
    from osless.sdk.queues import BatchFailed, Message, Queue, QueueSendError, queue

__all__ = [
    "JSON",
    "App",
    "BatchFailed",
    "ConfigError",
    "Context",
    "Field",
    "FunctionCallError",
    "Message",
    "OslessError",
    "Queue",
    "QueueSendError",
    "RemoteFunction",
    "Secret",
    "Service",
    "Settings",
    "UsageError",
    "Volume",
    "function",
    "queue",
    "service",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("osless.sdk"), name)
        globals()[name] = value  # once: later lookups are plain module attributes
        return value
    raise AttributeError(f"module 'osless' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
