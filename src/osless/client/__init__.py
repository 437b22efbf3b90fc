"""Clients of the osless API, shared by the CLI, the node agent, the gateway and the controllers.

Each name is imported on first use (PEP 562): the CLI needs only `Api` (`osless.client.sync`, on the
standard library), and a command must answer fast; httpx (`AsyncApi`) and pydantic (the informers)
are for the processes that run for days.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from osless.client.api import AsyncApi
    from osless.client.informer import Informer, ModelInformer
    from osless.client.sync import Api
    from osless.errors import ApiError

__all__ = ["Api", "ApiError", "AsyncApi", "Informer", "ModelInformer"]

_WHERE = {
    "Api": "osless.client.sync",
    "ApiError": "osless.errors",
    "AsyncApi": "osless.client.api",
    "Informer": "osless.client.informer",
    "ModelInformer": "osless.client.informer",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once: later lookups are plain module attributes
        return value
    raise AttributeError(f"module 'osless.client' has no attribute {name!r}")
