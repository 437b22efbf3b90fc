"""The resources that pass between the platform's parts, defined once: apps (their spec and their
status), releases, instances and nodes.

The API stores and serves these (`osless.api.models` re-exports them, next to its request bodies and
answers); the client side (the controllers, the node agent, the gateway) reads what the API answers
into them, with no FastAPI import: pydantic only.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

__all__ = [
    "APP_NAME_PATTERN",
    "APP_NAME_RULE",
    "DIGEST_PATTERN",
    "ID_PATTERN",
    "MAX_INSTANCES",
    "NDJSON",
    "App",
    "AppName",
    "AppStatus",
    "Autoscale",
    "Body",
    "ExitInfo",
    "Instance",
    "InstanceId",
    "InstanceStatus",
    "Integer",
    "MaybeInteger",
    "Node",
    "NodeLease",
    "Release",
    "ReleaseSummary",
    "check_app_name",
    "now",
]

MAX_INSTANCES = 100
# The SDK's rule for App(name), as JSON Schema can say it (and matched whole, so no trailing newline).
APP_NAME_PATTERN = r"^[a-z]([a-z0-9-]{0,38}[a-z0-9])?$"
APP_NAME_RULE = "use 1-40 lowercase letters, digits and '-', starting with a letter and not ending with '-'"
# Instance ids and node names become file and URL path segments: no '/', '..' or control characters.
ID_PATTERN = r"^[a-z0-9][a-z0-9.-]{0,80}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
NDJSON = "application/x-ndjson"


def check_app_name(name: str) -> bool:
    return re.fullmatch(APP_NAME_PATTERN, name) is not None


def _app_name(name: str) -> str:
    if not check_app_name(name):
        raise PydanticCustomError(
            "app_name", "invalid app name {name}: " + APP_NAME_RULE, {"name": repr(name)}
        )
    return name


def _instance_id(value: str) -> str:
    if re.fullmatch(ID_PATTERN, value) is None:
        raise PydanticCustomError(
            "instance_id", "{value} is not an instance id; `osless ps APP` lists them", {"value": repr(value)}
        )
    return value


# Validated here for a message that says how to fix it; the pattern is what the OpenAPI document shows.
AppName = Annotated[
    str, AfterValidator(_app_name), Field(json_schema_extra={"pattern": APP_NAME_PATTERN}, max_length=40)
]
InstanceId = Annotated[str, AfterValidator(_instance_id), Field(json_schema_extra={"pattern": ID_PATTERN})]


def _whole(value: Any) -> Any:
    # JSON has one kind of number: 3.0 is the integer 3, as JSON Schema says ("3" and true are not).
    return int(value) if isinstance(value, float) and value.is_integer() else value


# The validator wraps the union whole: around the int alone, it would keep Field(ge=...) out of the schema.
Integer = Annotated[int, BeforeValidator(_whole)]
MaybeInteger = Annotated[int | None, BeforeValidator(_whole)]


class Body(BaseModel):
    """A request body: JSON types as declared, never coerced from look-alikes."""

    model_config = ConfigDict(strict=True)


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
    # The host uid that is root inside the app's sandboxes: allocated by the API, unique, never reused.
    uid: int | None = None
    current_release: int | None = None
    current_image: str | None = None
    latest_release: int = 0
    min: int = 0
    max: int = 10
    autoscale: Autoscale = Field(default_factory=Autoscale)
    # Bumped by `osless restart`: the scheduler replaces, rolling, the instances made for an earlier one.
    restart: int = 0
    created_at: float = Field(default_factory=now)
    updated_at: float = Field(default_factory=now)


class AppStatus(BaseModel):
    """What the controllers say of an app, stored apart from its spec (`/appstatus/{app}`): their
    writes never conflict with people's (`osless scale`), nor wake what watches the spec."""

    app: str
    desired: int | None = None  # set by the autoscaler (and by a release, and by the activator)
    scale_reason: str = ""  # why `desired` is what it is, or why instances wait
    woken_at: float | None = None  # when a request last found the app at zero
    updated_at: float = Field(default_factory=now)


class ReleaseSummary(BaseModel):
    app: str
    version: int
    image: str
    description: str
    deploy_id: str | None = None
    created_at: float = Field(default_factory=now)


class Release(ReleaseSummary):
    manifest: dict[str, Any]


class ExitInfo(Body):
    code: MaybeInteger = Field(default=None, ge=0, le=255)
    signal: MaybeInteger = Field(default=None, ge=1, le=64)
    reason: str
    at: float = Field(default_factory=now)


class InstanceStatus(Body):
    phase: Literal["pending", "starting", "ready", "backoff", "failed", "stopping"] = "pending"
    pid: MaybeInteger = Field(default=None, ge=1)
    # The host uid the instance runs as (its app's, or root without a sandbox): the gateway checks
    # that the process answering on `socket` is this uid and `pid` before it sends it traffic.
    uid: MaybeInteger = Field(default=None, ge=0)
    socket: str | None = None  # the web socket: what the gateway relays clients' requests to
    control: str | None = None  # the control socket: function calls and health, the platform's only
    restarts: Integer = Field(default=0, ge=0)
    last_exit: ExitInfo | None = None
    message: str | None = None
    updated_at: float = Field(default_factory=now)


class Instance(Body):
    id: str = Field(pattern=ID_PATTERN)
    app: str
    release: Integer = Field(ge=1)
    image: str = Field(pattern=DIGEST_PATTERN)
    node: str = Field(pattern=ID_PATTERN)
    restart: Integer = Field(default=0, ge=0, description="the app's `restart` it was made for")
    uid: int | None = Field(default=None, description="the app's uid; set by the API, not the caller")
    created_at: float = Field(default_factory=now)
    status: InstanceStatus = Field(default_factory=InstanceStatus)


class NodeLease(Body):
    """A node's heartbeat, with what it says of itself: its name is the path's."""

    # At least a second: a lease shorter than the round trip that grants it is gone before it is used.
    ttl_s: float = Field(default=10.0, ge=1, le=300, description="gone this long without a heartbeat: lost")
    address: str | None = Field(default=None, max_length=255, description="where the node is reached")
    gateway: str | None = Field(default=None, max_length=255, description="the node's gateway URL")
    relay: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$",
        description="host:port where other nodes' gateways reach this node's instances (its relay)",
    )
    api: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^https?://[^/?#@\s]+$",
        description="the node API's URL (the logs of its instances), as http(s)://host:port",
    )
    pid: MaybeInteger = Field(default=None, ge=1, description="the node agent's process")
    memory_total_mb: MaybeInteger = Field(default=None, ge=0)
    memory_free_mb: MaybeInteger = Field(default=None, ge=0, description="available to new instances")


class Node(NodeLease):
    name: str = Field(pattern=ID_PATTERN)
    updated_at: float = Field(default_factory=now)
