"""The gateway: HTTP ingress, routing by app, balancing by outstanding requests."""

from __future__ import annotations

from osless.gateway.proxy import Gateway
from osless.gateway.router import Backend, NoBackend, Router

__all__ = ["Backend", "Gateway", "NoBackend", "Router"]
