"""The gateway: HTTP ingress, routing by app, balancing by outstanding requests."""

from __future__ import annotations

from osless.gateway.proxy import Gateway
from osless.gateway.router import Backend, NoBackend, Router
from osless.gateway.traffic import Traffic

__all__ = ["Backend", "Gateway", "NoBackend", "Router", "Traffic"]
