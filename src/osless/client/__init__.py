"""Clients of the osless API, shared by the CLI, the node agent, the gateway and the controllers.

The informers (and pydantic, which they pull in) are imported on first use (PEP 562): the CLI
needs only `Api`, and a command must answer fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from osless.client.api import Api, ApiError, AsyncApi

if TYPE_CHECKING:
    from osless.client.informer import Informer, ModelInformer

__all__ = ["Api", "ApiError", "AsyncApi", "Informer", "ModelInformer"]


def __getattr__(name: str) -> Any:
    if name in ("Informer", "ModelInformer"):
        value = getattr(importlib.import_module("osless.client.informer"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'osless.client' has no attribute {name!r}")
