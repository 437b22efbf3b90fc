"""The resources the API serves and stores: what is desired (spec) next to what is observed (status).

Also the bodies it reads (strict: a string is no number, a boolean no float) and the shapes it answers
with, so that the OpenAPI document says what really goes over the wire.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "App",
    "AppCreate",
    "AppDetail",
    "AppList",
    "AppName",
    "Autoscale",
    "Body",
    "CallsReceived",
    "CallsReport",
    "ConfigChange",
    "ConfigChangeSummary",
    "ConfigHistory",
    "ConfigPatch",
    "ConfigRollback",
    "ConfigSchemaView",
    "ConfigState",
    "ConfigView",
    "Deploy",
    "DeployList",
    "DeployLogEnd",
    "DesiredRequest",
    "Endpoint",
    "Endpoints",
    "ExitInfo",
    "GatewayStats",
    "Instance",
    "InstanceId",
    "InstanceList",
    "InstanceStatus",
    "Integer",
    "LogRecord",
    "MaybeInteger",
    "Node",
    "NodeConfig",
    "NodeConfigList",
    "NodeLease",
    "NodeList",
    "Release",
    "ReleaseList",
    "ReleaseSummary",
    "RollbackRequest",
    "ScaleRequest",
    "StatsReceived",
    "StatsView",
    "StatusView",
    "WatchEvent",
    "WhoAmI",
    "check_app_name",
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
    desired: int | None = None  # status: set by the autoscaler (and by a deploy, and by the activator)
    scale_reason: str = ""
    woken_at: float | None = None  # status: when a request last found the app at zero
    created_at: float = Field(default_factory=now)
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


class Deploy(BaseModel):
    id: str
    app: str | None = None
    status: Literal["building", "succeeded", "failed"] = "building"
    release: int | None = None
    image: str | None = None
    error: str | None = None
    deps_cached: bool | None = None
    # Which server's builder holds it while `building`: a key under /builders/ on that server's lease.
    # Once the key is gone (the server stopped or lost the store), any server fails the deploy.
    builder: str | None = None
    created_at: float = Field(default_factory=now)
    finished_at: float | None = None


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


class ScaleRequest(Body):
    """Only the fields given change."""

    min: MaybeInteger = Field(default=None, ge=0, le=MAX_INSTANCES)
    max: MaybeInteger = Field(default=None, ge=1, le=MAX_INSTANCES)
    target: float | None = Field(default=None, gt=0, le=10_000)
    idle_s: float | None = Field(default=None, ge=1, le=86_400)
    concurrency_limit: MaybeInteger = Field(default=None, ge=1, le=100_000)
    max_body_mb: float | None = Field(default=None, gt=0, le=1024)

    @model_validator(mode="after")
    def _ordered(self) -> ScaleRequest:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class DesiredRequest(Body):
    desired: Integer = Field(ge=0, le=MAX_INSTANCES)
    reason: str = Field(default="", max_length=200)


class GatewayStats(Body):
    """What a gateway saw of each app over its last interval."""

    interval_s: float = Field(gt=0, le=60)
    apps: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='{app: {"concurrency": avg in flight, "requests": n, "waiting": n}}'
    )


class RollbackRequest(Body):
    to: MaybeInteger = Field(default=None, ge=1, description="release version; default: the one before")


class ConfigState(BaseModel):
    """An app's current config: every value set; secrets as {"$secret": <ciphertext>}."""

    app: str
    version: int = 0
    values: dict[str, Any] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=now)
    updated_by: str | None = None


class ConfigChangeSummary(BaseModel):
    app: str
    version: int
    by: str | None
    description: str
    changes: dict[str, Any] = Field(description='{key: {"set": value} or {"unset": true}}; secrets masked')
    at: float = Field(default_factory=now)


class ConfigChange(ConfigChangeSummary):
    """One revision of an app's config: who changed what (secrets masked), and the whole result."""

    values: dict[str, Any]


class ConfigPatch(Body):
    set: dict[str, Any] = Field(
        default_factory=dict, description="keys to values (JSON, or strings to coerce)"
    )
    unset: list[str] = Field(default_factory=list)
    revision: MaybeInteger = Field(default=None, ge=0, description="the version you read: 409 if it moved on")


class ConfigRollback(Body):
    to: Integer = Field(ge=0, description="the config version to return to; 0: no values at all")
    drop_secrets: bool = Field(
        default=False, description="remove the secrets set now that version `to` has no value for"
    )


class AppCreate(Body):
    name: AppName


class CallsReport(Body):
    calls: list[dict[str, Any]] = Field(description='[{"caller": app, "callee": app, "count": n}, ...]')


# What the API answers with (each also in the OpenAPI document).


class AppList(BaseModel):
    items: list[App]
    revision: int = Field(description="watch from here: ?watch=true&revision=N")


class AppDetail(App):
    release: Release | None = Field(description="the current release")
    instances: list[Instance]
    calls: dict[str, int] = Field(description="apps this one called through the egress proxies: {app: n}")
    called_by: dict[str, int] = Field(description="apps that called this one: {app: n}")


class Endpoint(BaseModel):
    id: str
    node: str
    release: int
    socket: str | None


class Endpoints(BaseModel):
    app: str
    url: str = Field(description="through the gateway, from outside")
    internal_url: str = Field(description="from other apps, through their egress proxy")
    instances: list[Endpoint] = Field(description="the ready ones")
    revision: int


class ReleaseList(BaseModel):
    items: list[ReleaseSummary]
    revision: int


class DeployList(BaseModel):
    items: list[Deploy]
    revision: int


class InstanceList(BaseModel):
    items: list[Instance]
    revision: int


class NodeList(BaseModel):
    items: list[Node]
    revision: int


class WatchEvent(BaseModel):
    """One line of a watch stream (NDJSON)."""

    type: Literal["PUT", "DELETE", "BOOKMARK", "ERROR"]
    revision: int
    name: str | None = None
    object: dict[str, Any] | None = Field(default=None, description="the resource as a list shows it")
    code: str | None = Field(default=None, description="ERROR: compacted (list again) or watch_failed")
    message: str | None = None


class LogRecord(BaseModel):
    """One line of a log (NDJSON)."""

    ts: float
    source: str
    stream: str
    line: str


class DeployLogEnd(BaseModel):
    """The last line of a deploy's log."""

    deploy: Deploy


class StatsReceived(BaseModel):
    apps: int = Field(description="how many apps the report named")


class CallsReceived(BaseModel):
    calls: int = Field(description="how many edges the report carried")


class StatsView(BaseModel):
    apps: dict[str, dict[str, float]] = Field(description='{app: {"concurrency", "requests", "waiting"}}')
    at: float


class ConfigView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    app: str
    version: int = Field(description="0 until something is set; every change adds one")
    values: dict[str, Any] = Field(description="every value set; secrets as ********")
    config_schema: dict[str, dict[str, Any]] | None = Field(
        alias="schema", description="the current release's: {key: {type, required, restart, default}}"
    )
    updated_at: float
    updated_by: str | None


class ConfigSchemaView(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    app: str
    config_schema: dict[str, dict[str, Any]] = Field(alias="schema")


class ConfigHistory(BaseModel):
    items: list[ConfigChangeSummary] = Field(description="newest first")


class NodeConfig(BaseModel):
    app: str
    version: int
    values: dict[str, Any] = Field(description="in clear")
    token: str = Field(description="the app's own token, for its instances")


class NodeConfigList(BaseModel):
    items: list[NodeConfig]
    revision: int


class StatusView(BaseModel):
    version: str
    revision: int
    uptime_s: float
    gateway: str
    apps: int
    instances: dict[str, int] = Field(description="how many in each phase")
    nodes: list[str]
    builds_running: int


class WhoAmI(BaseModel):
    name: str | None
    role: str | None
    app: str | None = None  # the one app the token is limited to
    expires_at: float | None = None
    permissions: list[str] = []  # what its role may do (api/auth.py ROLES)


class LeaderClaim(Body):
    """A candidate asking for (or renewing) a leadership: taken only if free or already its own."""

    holder: str = Field(pattern=ID_PATTERN, description="who asks: unique per candidate process")
    # At least a second (a lease shorter than the round trip that grants it is gone before it is
    # used); at most a minute, so that a dead leader is not waited on for long.
    ttl_s: float = Field(default=3.0, ge=1, le=60, description="held this long without a renewal")


class Leader(BaseModel):
    name: str
    holder: str
    ttl_s: float
    acquired_at: float = Field(default_factory=now)
    renewed_at: float = Field(default_factory=now)
