"""The resources that pass between the platform's parts, defined once: apps (their spec and their
status), releases, instances, nodes and image manifests.

The API stores and serves these (`osless.api.models` re-exports them, next to its request bodies and
answers); the client side (the controllers, the node agent, the gateway) reads what the API answers
into them, with no FastAPI import: pydantic only.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "APP_NAME_PATTERN",
    "APP_NAME_RULE",
    "DIGEST_PATTERN",
    "ID_PATTERN",
    "MAX_INSTANCES",
    "MAX_VOLUME_PATH",
    "NDJSON",
    "App",
    "AppName",
    "AppStatus",
    "Autoscale",
    "Body",
    "ConfigKeySpec",
    "ExitInfo",
    "FunctionManifest",
    "ImageArchives",
    "ImageLayers",
    "ImageManifest",
    "Instance",
    "InstanceId",
    "InstanceStatus",
    "Integer",
    "LayerArchiveRef",
    "MaybeInteger",
    "Node",
    "NodeLease",
    "Release",
    "ReleaseSummary",
    "VolumeManifest",
    "WebManifest",
    "check_app_name",
    "manifest_problem",
    "now",
    "volume_path",
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
    manifest: ImageManifest


class ExitInfo(Body):
    code: MaybeInteger = Field(default=None, ge=0, le=255)
    signal: MaybeInteger = Field(default=None, ge=1, le=64)
    reason: str
    at: float = Field(default_factory=now)


class InstanceStatus(Body):
    # debugging: a debug session is attached (`osless debug attach`), out of the gateway's rotation
    phase: Literal["pending", "starting", "ready", "backoff", "failed", "stopping", "debugging"] = "pending"
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


# -- the image manifest -----------------------------------------------------------------------------
# Written by the builder, partly from what the app's own process printed at build time (its functions,
# web app, volumes, egress and config schema): untrusted wherever it is read. Every string is bounded
# here; the collections are bounded by the manifest's own cap (256 KiB, `images.MAX_MANIFEST_BYTES`),
# which every reader checks before it parses a byte.

# The SDK's rules (`osless.sdk.app`, `osless.sdk.config`), as a manifest carries them.
FUNCTION_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
VOLUME_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
HOST_PATTERN = r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$"
CONFIG_KEY_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
MIN_MEMORY_MB, MAX_MEMORY_MB = 16, 65536
MIN_VOLUME_MB, MAX_VOLUME_MB = 16, 1024 * 1024
# A layer is a whole virtualenv at most: CUDA builds of torch pass 2 GB; past this a manifest lies.
MAX_LAYER_BYTES = 64 << 30
MAX_RELEASE_COMMANDS, RELEASE_COMMAND_CHARS = 10, 4096

Digest = Annotated[str, Field(pattern=DIGEST_PATTERN)]
FunctionName = Annotated[str, Field(pattern=FUNCTION_NAME_PATTERN)]
MemoryMb = Annotated[int, Field(ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB)]
# Kept as written (30 stays 30, 30.0 stays 30.0): a manifest dumps to the bytes it was read from.
Seconds = int | float


def _within(most: float) -> AfterValidator:
    def check(value: float) -> float:
        if not 0 < value <= most:
            raise PydanticCustomError("seconds", "give a number of seconds in (0, {most}]", {"most": most})
        return value

    return AfterValidator(check)


class _ManifestPart(BaseModel):
    """A part of an image manifest: JSON types as declared (never coerced), no key it does not know,
    and dumped as it was read: a key that was absent stays absent (no default is ever written), so
    `dump(parse(bytes)) == bytes` and the image digest holds.

    `extra="forbid"`: what the app printed is already checked key by key at build time, so a key
    unknown here comes from a tampered store or a newer builder, whose meaning (a limit, say) this
    code cannot honour; the image is refused, naming the key, rather than run otherwise than built."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, validate_by_alias=True, serialize_by_alias=True
    )

    @model_serializer(mode="wrap")
    def _as_read(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # An object in the OpenAPI document, as the manifest was before it was a model.
        data: dict[str, Any] = handler(self)
        for name, field in type(self).model_fields.items():
            if name not in self.model_fields_set:
                data.pop(field.alias or name, None)
        return data


class LayerArchiveRef(_ManifestPart):
    """A layer as a node pulls it: its deterministic tar's sha256 and size."""

    sha256: Digest
    size: int = Field(ge=0, le=MAX_LAYER_BYTES)


class ImageLayers(_ManifestPart):
    """The image's layers, by digest: the code (its source archive's sha256) and its dependencies."""

    code: Digest
    deps: Digest


class ImageArchives(_ManifestPart):
    code: LayerArchiveRef
    deps: LayerArchiveRef


class FunctionManifest(_ManifestPart):
    memory_mb: MemoryMb
    timeout_s: Annotated[Seconds, _within(3600)]
    is_async: bool = Field(alias="async")
    http: bool = False  # `@app.function(http=True)`: HTTP requests reach it through the gateway
    # Reachable through the gateway without a token (rate-limited per client); absent: not.
    public: bool = False
    # Async invocations: tries after a failed first one, and the age past which none starts (sdk/app.py).
    retries: int = Field(default=2, ge=0, le=10)
    max_age_s: int = Field(default=3600, ge=60, le=21600)


class ScheduleManifest(_ManifestPart):
    """`@app.schedule`: when the function of its name runs (checked with croniter at deploy:
    `osless.schedules.check`). Exactly one of `cron` and `every_s`."""

    cron: str | None = Field(default=None, min_length=9, max_length=200)
    every_s: int | None = Field(default=None, ge=1, le=31 * 24 * 3600)
    tz: str = Field(default="UTC", max_length=100)
    catch_up: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> ScheduleManifest:
        if (self.cron is None) == (self.every_s is None):
            raise PydanticCustomError("schedule_kind", "exactly one of cron and every_s")
        return self


QUEUE_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"


class ConsumerManifest(_ManifestPart):
    """`@app.on_message(queue, ...)`: the function of its name consumes `{app}.{queue}` (sdk/app.py)."""

    queue: str = Field(pattern=QUEUE_NAME_PATTERN)
    batch_size: int = Field(ge=1, le=100)
    max_concurrency: int = Field(ge=1, le=100)
    visibility_timeout_s: int = Field(ge=1, le=3600)
    retries: int = Field(ge=0, le=10)


class WebManifest(_ManifestPart):
    name: FunctionName
    memory_mb: MemoryMb
    timeout_s: Annotated[Seconds, _within(3600)]
    max_duration_s: Annotated[Seconds, _within(86_400)]
    kind: Literal["asgi", "wsgi"] = "asgi"


class VolumeManifest(_ManifestPart):
    name: str = Field(pattern=VOLUME_NAME_PATTERN)
    size_mb: int = Field(ge=MIN_VOLUME_MB, le=MAX_VOLUME_MB)


class ConfigKeySpec(_ManifestPart):
    """One key of the app's config schema (`osless.Field`)."""

    type: Literal["str", "int", "float", "bool", "json", "secret"]
    required: bool
    restart: bool
    default: JsonValue = None  # present exactly when the key is not required
    doc: str = Field(default="", max_length=2000)

    @model_validator(mode="after")
    def _default_unless_required(self) -> ConfigKeySpec:
        if ("default" in self.model_fields_set) == self.required:
            raise PydanticCustomError("config_default", "a default exactly when the key is not required")
        return self


class ImageManifest(_ManifestPart):
    """What an image is: its layers (and their archives), how to start it, and what the app declared.

    Its digest is the sha256 of its canonical JSON (`images.canonical_json`): readers keep the exact
    bytes they were given and parse them into this for reading, never serialise it again to check."""

    schema_: Literal[1] = Field(alias="schema")
    app: AppName
    entry: str = Field(pattern=MODULE_PATTERN, max_length=200)
    python: str = Field(pattern=r"^[0-9]{1,2}\.[0-9]{1,3}$")
    layers: ImageLayers
    # None: an image of a release from before archives (their sha256 is then the API's word).
    layer_archives: ImageArchives | None = None
    lock: str = ""  # the pinned requirements
    functions: dict[FunctionName, FunctionManifest] = Field(default_factory=dict)
    web: WebManifest | None = None
    # A plain name: a release from before sizes (the SDK's default size).
    volumes: dict[
        Annotated[str, Field(pattern=r"^/", max_length=1024)],
        VolumeManifest | Annotated[str, Field(pattern=VOLUME_NAME_PATTERN)],
    ] = Field(default_factory=dict)
    egress: list[Annotated[str, Field(pattern=HOST_PATTERN, max_length=253)]] = Field(default_factory=list)
    config: dict[Annotated[str, Field(pattern=CONFIG_KEY_PATTERN)], ConfigKeySpec] = Field(
        default_factory=dict
    )
    # Release steps (`App(release=[...])`): run in order, each as `osless run` would, before the
    # release takes traffic. Absent when there are none, so older images keep their digest.
    release: list[Annotated[str, Field(min_length=1, max_length=RELEASE_COMMAND_CHARS)]] = Field(
        default_factory=list, max_length=MAX_RELEASE_COMMANDS
    )
    # Queue consumers, by function name; absent when there are none, as release steps.
    consumers: dict[FunctionName, ConsumerManifest] = Field(default_factory=dict)

    # `@app.schedule`s, by the name of the function each runs. Absent when none (older digests stay).
    schedules: dict[FunctionName, ScheduleManifest] = Field(default_factory=dict, max_length=100)

    def archived_layers(self) -> dict[str, LayerArchiveRef]:
        """Each layer's archive by the layer's id (none for an image from before archives)."""
        if self.layer_archives is None:
            return {}
        return {self.layers.code: self.layer_archives.code, self.layers.deps: self.layer_archives.deps}

    def config_schema(self) -> dict[str, dict[str, Any]]:
        """The config schema as JSON, as the API shows it and checks values against it (`api.schema`)."""
        return {key: spec.model_dump(mode="json") for key, spec in self.config.items()}

    def memory_mb(self, default: int = 256) -> int:
        """What one instance asks: it serves every handler, so the largest any of them asks for."""
        sizes = [f.memory_mb for f in self.functions.values()]
        if self.web is not None:
            sizes.append(self.web.memory_mb)
        return max(sizes, default=default)

    def longest_timeout_s(self, default: float = 30.0) -> float:
        """The longest any handler may run: what a stopping instance gives its requests in flight."""
        times = [f.timeout_s for f in self.functions.values()]
        if self.web is not None:
            times.append(self.web.timeout_s)
        return max(times, default=default)


def manifest_problem(error: ValidationError) -> str:
    """What is wrong with a manifest, naming the fields (at most three), without echoing their values."""
    problems = []
    for e in error.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(part)[:64] for part in e["loc"]) or "the manifest"
        problems.append(f"{where}: {str(e['msg'])[:200]}")
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


# -- a path inside a volume (`osless volumes`), as the API and the node both check it --------------
MAX_VOLUME_PATH = 1024  # characters


def volume_path(path: str) -> list[str]:
    """The names of a relative path inside a volume ("" is its root); ValueError saying why not."""
    if len(path) > MAX_VOLUME_PATH:
        raise ValueError(f"a path inside a volume has at most {MAX_VOLUME_PATH} characters")
    if "\0" in path or path.startswith("/"):
        raise ValueError("a path inside a volume is relative and holds no NUL character")
    names = [p for p in path.split("/") if p not in ("", ".")]
    for name in names:
        if name == "..":
            raise ValueError("a path inside a volume may not hold '..'")
        if len(name.encode("utf-8", "surrogateescape")) > 255:
            raise ValueError("a name inside a volume has at most 255 bytes")
    return names
