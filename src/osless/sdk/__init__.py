"""What app code imports. Nothing here reaches the server side of osless."""

from __future__ import annotations

from osless.sdk.app import App, FunctionSpec, Volume, WebSpec
from osless.sdk.calls import FunctionCallError, RemoteFunction, function
from osless.sdk.config import JSON, Field, Secret, Settings
from osless.sdk.context import Context
from osless.sdk.errors import ConfigError, OslessError, UsageError
from osless.sdk.queues import BatchFailed, Message, Queue, QueueSendError, queue
from osless.sdk.service import Service, service

__all__ = [
    "JSON",
    "App",
    "BatchFailed",
    "ConfigError",
    "Context",
    "Field",
    "FunctionCallError",
    "FunctionSpec",
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
    "WebSpec",
    "function",
    "queue",
    "service",
]
