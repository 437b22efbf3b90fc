"""The resources the API serves and stores (defined once in `osless.contracts`, re-exported here).

Also the bodies it reads (strict: a string is no number, a boolean no float) and the shapes it answers
with, so that the OpenAPI document says what really goes over the wire.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from osless.contracts import (
    APP_NAME_PATTERN,
    APP_NAME_RULE,
    DIGEST_PATTERN,
    ID_PATTERN,
    MAX_INSTANCES,
    NDJSON,
    App,
    AppName,
    AppStatus,
    Autoscale,
    Body,
    ExitInfo,
    Instance,
    InstanceId,
    InstanceStatus,
    Integer,
    MaybeInteger,
    Node,
    NodeLease,
    Release,
    ReleaseSummary,
    check_app_name,
    now,
)

__all__ = [
    "APP_NAME_PATTERN",
    "APP_NAME_RULE",
    "DIGEST_PATTERN",
    "ID_PATTERN",
    "MAX_INSTANCES",
    "NDJSON",
    "App",
    "AppCreate",
    "AppDetail",
    "AppList",
    "AppName",
    "AppStatus",
    "AppStatusList",
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
    "now",
]


class Deploy(BaseModel):
    id: str
    app: str | None = None
    # queued (stored, waiting for a builder) -> building (claimed) -> succeeded | failed
    status: Literal["queued", "building", "succeeded", "failed"] = "queued"
    release: int | None = None
    image: str | None = None
    error: str | None = None
    deps_cached: bool | None = None
    # Which builder process claimed it while `building`: a key under /builders/ on that builder's
    # lease. Once the key is gone (the builder stopped or lost the API), any server fails the deploy.
    builder: str | None = None
    created_at: float = Field(default_factory=now)
    finished_at: float | None = None
    # Said when read, never stored: why a `queued` deploy waits (no builder runs, or its source is gone).
    reason: str | None = Field(default=None, description="why a queued deploy waits; null otherwise")


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


TrafficFigure = Literal["concurrency", "requests", "waiting"]


class GatewayStats(Body):
    """What a gateway saw of each app over its last interval."""

    interval_s: float = Field(gt=0, le=60)
    apps: dict[str, dict[TrafficFigure, Annotated[float, Field(ge=0, le=1e6)]]] = Field(
        default_factory=dict,
        max_length=10_000,
        description='{app: {"concurrency": avg in flight, "requests": n, "waiting": n}}',
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


class AppStatusList(BaseModel):
    items: list[AppStatus]
    revision: int = Field(description="watch from here: ?watch=true&revision=N")


class AppDetail(App):
    status: AppStatus = Field(description="what the controllers say of it: desired instances and why")
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
    # The id of the token that took it: only that token renews it or steps it down, so a controller
    # cannot keep or drop another's term by naming its holder. Not shown (`LEADER_HIDDEN`).
    token: str | None = None
    acquired_at: float = Field(default_factory=now)
    renewed_at: float = Field(default_factory=now)
