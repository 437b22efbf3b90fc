"""Clients of the osless API, shared by the CLI, the node agent, the gateway and the controllers."""

from __future__ import annotations

from osless.client.api import Api, ApiError, AsyncApi
from osless.client.informer import Informer, ModelInformer

__all__ = ["Api", "ApiError", "AsyncApi", "Informer", "ModelInformer"]
