"""The resources the API serves and stores: what is desired (spec) next to what is observed (status)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from osless.sdk.app import NAME_RE

__all__ = [
    "App",
    "Autoscale",
    "ConfigChange",
    "ConfigPatch",
    "ConfigRollback",
    "ConfigState",
    "Deploy",
    "DesiredRequest",
    "ExitInfo",
    "GatewayStats",
    "Instance",
    "InstanceStatus",
    "Node",
    "Release",
    "RollbackRequest",
    "ScaleRequest",
    "check_app_name",
]

MAX_INSTANCES = 100
# Instance ids and node names become file and URL path segments: no '/', '..' or control characters.
ID_PATTERN = r"^[a-z0-9][a-z0-9.-]{0,80}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"


def check_app_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


def now() -> float:
    return round(time.time(), 3)


class Autoscale(BaseModel):
    """How an app follows its traffic (Knative's KPA, in short): concurrency per instance."""

    target: float = Field(default=10.0, gt=0, le=10_000, description="concurrent requests per instance")
    idle_s: float = Field(
        default=60.0, ge=1, le=86_400, description="idle this long, then zero (if min is 0)"
    )
    stable_s: float = Field(
        default=60.0, ge=1, le=3_600, description="the window scaling decisions average over"
    )
    panic_s: float = Field(default=6.0, ge=1, le=600, description="the short window that reacts to bursts")
    concurrency_limit: int = Field(
        default=1000, ge=1, le=100_000, description="in flight at once; past it 429"
    )
    max_body_mb: float = Field(default=10.0, gt=0, le=1024, description="request body limit; past it 413")


class App(BaseModel):
    name: str
    current_release: int | None = None
    current_image: str | None = None
    latest_release: int = 0
    min: int = 0
    max: int = 10
    autoscale: Autoscale = Field(default_factory=Autoscale)
    desired: int | None = None  # status: set by the autoscaler (and by a deploy, and by the activator)
    scale_reason: str = ""
    woken_at: float | None = None  # status: when a request last found the app at zero
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class Release(BaseModel):
    app: str
    version: int
    image: str
    manifest: dict[str, Any]
    description: str
    deploy_id: str | None = None
    created_at: float = Field(default_factory=now)


class Deploy(BaseModel):
    id: str
    app: str | None = None
    status: Literal["building", "succeeded", "failed"] = "building"
    release: int | None = None
    image: str | None = None
    error: str | None = None
    deps_cached: bool | None = None
    created_at: float = Field(default_factory=now)
    finished_at: float | None = None


class ExitInfo(BaseModel):
    code: int | None = None
    signal: int | None = None
    reason: str
    at: float = Field(default_factory=now)


class InstanceStatus(BaseModel):
    phase: Literal["pending", "starting", "ready", "backoff", "failed", "stopping"] = "pending"
    pid: int | None = None
    socket: str | None = None
    restarts: int = 0
    last_exit: ExitInfo | None = None
    message: str | None = None
    updated_at: float = Field(default_factory=now)


class Instance(BaseModel):
    id: str = Field(pattern=ID_PATTERN)
    app: str
    release: int = Field(ge=1)
    image: str = Field(pattern=DIGEST_PATTERN)
    node: str = Field(pattern=ID_PATTERN)
    created_at: float = Field(default_factory=now)
    status: InstanceStatus = Field(default_factory=InstanceStatus)


class Node(BaseModel):
    name: str = Field(pattern=ID_PATTERN)
    ttl_s: float = Field(default=10.0, gt=0, le=300)
    updated_at: float = Field(default_factory=now)


class ScaleRequest(BaseModel):
    """Only the fields given change."""

    min: int | None = Field(default=None, ge=0, le=MAX_INSTANCES)
    max: int | None = Field(default=None, ge=1, le=MAX_INSTANCES)
    target: float | None = Field(default=None, gt=0, le=10_000)
    idle_s: float | None = Field(default=None, ge=1, le=86_400)
    concurrency_limit: int | None = Field(default=None, ge=1, le=100_000)
    max_body_mb: float | None = Field(default=None, gt=0, le=1024)

    @model_validator(mode="after")
    def _ordered(self) -> ScaleRequest:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class DesiredRequest(BaseModel):
    desired: int = Field(ge=0, le=MAX_INSTANCES)
    reason: str = Field(default="", max_length=200)


class GatewayStats(BaseModel):
    """What a gateway saw of each app over its last interval."""

    interval_s: float = Field(gt=0, le=60)
    apps: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='{app: {"concurrency": avg in flight, "requests": n, "waiting": n}}'
    )


class RollbackRequest(BaseModel):
    to: int | None = Field(default=None, ge=1, description="release version; default: the one before")


class ConfigState(BaseModel):
    """An app's current config: every value set; secrets as {"$secret": <ciphertext>}."""

    app: str
    version: int = 0
    values: dict[str, Any] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=now)
    updated_by: str | None = None


class ConfigChange(BaseModel):
    """One revision of an app's config: who changed what (secrets masked), and the whole result."""

    app: str
    version: int
    by: str | None
    description: str
    changes: dict[str, Any]
    values: dict[str, Any]
    at: float = Field(default_factory=now)


class ConfigPatch(BaseModel):
    set: dict[str, Any] = Field(
        default_factory=dict, description="keys to values (JSON, or strings to coerce)"
    )
    unset: list[str] = Field(default_factory=list)
    revision: int | None = Field(default=None, ge=0, description="the version you read: 409 if it moved on")


class ConfigRollback(BaseModel):
    to: int = Field(ge=0, description="the config version to return to; 0: no values at all")
    drop_secrets: bool = Field(
        default=False, description="remove the secrets set now that version `to` has no value for"
    )
