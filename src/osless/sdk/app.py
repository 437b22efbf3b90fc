"""`osless.App`: what an app declares in code (functions, a web app), turned into a manifest."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, overload

from osless.sdk.config import Field, Settings, check_fields, read_schema
from osless.sdk.errors import UsageError
from osless.sdk.queues import QUEUE_RE, consumer_entry

__all__ = [
    "DEFAULT_VOLUME_MB",
    "App",
    "ConfigHook",
    "ConsumerSpec",
    "FunctionSpec",
    "ScheduleSpec",
    "Volume",
    "WebSpec",
    "read_volumes",
]

F = TypeVar("F", bound=Callable[..., Any])
# Called with {key: new value} after each change; sync or async.
ConfigHook = Callable[[dict[str, Any]], Any]
H = TypeVar("H", bound=ConfigHook)

# App names become URL path segments and host labels, so they follow DNS label rules.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$|^[a-z]$")
VOLUME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$")
# A volume may not cover what the sandbox itself provides.
RESERVED = ("/", "/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys", "/tmp", "/run")
FUNCTION_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Async invocations (as Lambda: 2 retries, up to 6 h old); contracts.FunctionManifest holds the same bounds.
DEFAULT_RETRIES = 2
MAX_RETRIES = 10
DEFAULT_MAX_AGE_S = 3600
MIN_MAX_AGE_S = 60
MAX_MAX_AGE_S = 21600
DEFAULT_VOLUME_MB = 1024  # what a volume given as a plain name gets
# Below 16 MB an ext4 with its journal leaves too little room; past 1 TiB, ask the operator for a disk.
MIN_VOLUME_MB, MAX_VOLUME_MB = 16, 1024 * 1024
MIN_MEMORY_MB, MAX_MEMORY_MB = 16, 65536
# Build steps: shell commands, each logged and shown in errors, so a few and short.
MAX_BUILD_STEPS, MAX_BUILD_STEP_CHARS = 20, 4096
# Schedules: a time zone's IANA name (checked against the zone database at deploy), and how many.
TZ_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]{0,30}(/[A-Za-z0-9][A-Za-z0-9_+-]{0,30}){0,2}$")
MAX_SCHEDULES = 100
MAX_EVERY_S = 31 * 24 * 3600  # as osless.schedules
# Consumers (`@app.on_message`); contracts.ConsumerManifest holds the same bounds.
MAX_BATCH_SIZE = 100
MAX_CONSUMER_CONCURRENCY = 100
DEFAULT_VISIBILITY_S = 30


@dataclass(frozen=True)
class FunctionSpec:
    """A Lambda-style handler `(event, ctx)` and the resources it asks for."""

    name: str
    handler: Callable[..., Any]
    memory_mb: int
    timeout_s: float
    is_async: bool
    http: bool = False  # HTTP requests reach it as Lambda Function URL events (runtime/function_url.py)
    public: bool = False  # callable through the gateway without a token
    retries: int = DEFAULT_RETRIES  # async invocations: tries after the first that failed
    max_age_s: int = DEFAULT_MAX_AGE_S  # async invocations: none started once older than this

    def manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "memory_mb": self.memory_mb,
            "timeout_s": self.timeout_s,
            "async": self.is_async,
        }
        if self.http:  # absent otherwise: the manifests of apps without one stay as they were
            spec["http"] = True
        if self.public:  # absent otherwise: the manifests (and digests) of other functions stay as they were
            spec["public"] = True
        # Absent when default, as above: existing manifests and their digests stay as they were.
        if self.retries != DEFAULT_RETRIES:
            spec["retries"] = self.retries
        if self.max_age_s != DEFAULT_MAX_AGE_S:
            spec["max_age_s"] = self.max_age_s
        return spec


@dataclass(frozen=True)
class ScheduleSpec:
    """When the function of the same name runs: a cron expression in a time zone, or every N seconds.
    The expression and the zone are checked at deploy (by the builder, with croniter: not here, in
    the app's sandbox, which has neither)."""

    name: str
    cron: str | None
    every_s: int | None
    tz: str = "UTC"
    catch_up: bool = False  # a tick missed while the platform was down: run once at start (or skip)

    def manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"cron": self.cron} if self.cron is not None else {"every_s": self.every_s}
        spec.update(tz=self.tz, catch_up=self.catch_up)
        return spec


@dataclass(frozen=True)
class ConsumerSpec:
    """`@app.on_message(queue)`: the function `name` gets the queue's messages, `batch_size` at a time."""

    name: str  # the function the platform calls (consumer_entry around the handler)
    queue: str
    batch_size: int = 1
    max_concurrency: int = 10  # batches in flight at once, across the platform
    visibility_timeout_s: int = DEFAULT_VISIBILITY_S  # the handler's timeout; then its batch is tried again
    retries: int = DEFAULT_RETRIES  # tries after the first; then the message goes to the queue's DLQ

    def manifest(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "batch_size": self.batch_size,
            "max_concurrency": self.max_concurrency,
            "visibility_timeout_s": self.visibility_timeout_s,
            "retries": self.retries,
        }


@dataclass(frozen=True)
class WebSpec:
    """A factory returning an ASGI or WSGI app, called once per release in the zygote."""

    name: str
    factory: Callable[[], Any]
    memory_mb: int
    timeout_s: float  # the longest the app may stay silent: before an answer, or within a stream
    max_duration_s: float = 3600.0  # no request (a stream, a websocket) lives longer

    def manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_mb": self.memory_mb,
            "timeout_s": self.timeout_s,
            "max_duration_s": self.max_duration_s,
        }


@dataclass(frozen=True)
class Volume:
    """A persistent, writable folder of a declared size: `osless.Volume("orders-data", size_mb=512)`.

    Writing past `size_mb` fails with ENOSPC (no space left on device), as on a full disk."""

    name: str
    _: KW_ONLY
    size_mb: int = DEFAULT_VOLUME_MB

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not VOLUME_RE.fullmatch(self.name):
            raise UsageError(
                f"volume name {self.name!r} must be 1-63 lowercase letters, digits and '-', starting with "
                'a letter or digit (for example osless.Volume("orders-data"))'
            )
        size = self.size_mb
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_VOLUME_MB <= size <= MAX_VOLUME_MB:
            raise UsageError(
                f"Volume({self.name!r}, size_mb={size!r}): give a whole number of MB between "
                f"{MIN_VOLUME_MB} and {MAX_VOLUME_MB}, for example size_mb=512"
            )

    def manifest(self) -> dict[str, Any]:
        return {"name": self.name, "size_mb": self.size_mb}


@dataclass
class App:
    """An osless application: `app = osless.App("shop")`, then decorate handlers with it."""

    name: str
    _: KW_ONLY
    volumes: Mapping[str, Volume | str] = field(default_factory=dict)
    egress: list[str] = field(default_factory=list)
    # Release steps: commands run once per new release, in order, before it takes traffic.
    release: list[str] = field(default_factory=list)
    # Build steps: commands run at build time, in the build sandbox; their output goes into the image.
    build: list[str] = field(default_factory=list)
    functions: dict[str, FunctionSpec] = field(default_factory=dict, init=False)
    schedules: dict[str, ScheduleSpec] = field(default_factory=dict, init=False)
    web_spec: WebSpec | None = field(default=None, init=False)
    settings: Settings | None = field(default=None, init=False, repr=False)
    config_hooks: list[ConfigHook] = field(default_factory=list, init=False, repr=False)
    consumers: dict[str, ConsumerSpec] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_RE.fullmatch(self.name):
            raise UsageError(
                f"invalid app name {self.name!r}: use 1-40 lowercase letters, digits and '-', "
                'starting with a letter (for example App("shop"))'
            )
        self.volumes = _check_volumes(self.volumes)  # plain names become Volume(name) of the default size
        self.egress = _check_egress(self.egress)
        self.release = _check_release(self.release)
        self.build = _check_build(self.build)

    def function(
        self,
        _fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        memory_mb: int = 256,
        timeout_s: float = 30.0,
        http: bool = False,
        public: bool = False,
        retries: int = DEFAULT_RETRIES,
        max_age_s: int = DEFAULT_MAX_AGE_S,
    ) -> Callable[[F], F]:
        """Register a Lambda-style handler `def handler(event, ctx)`; sync or async.

        `http=True` also lets HTTP requests reach it, without a token, as a Lambda Function URL does:
        each request is an API Gateway HTTP API (payload format 2.0) event, and its answer
        (`{"statusCode", "headers", "body", ...}`) the HTTP answer (see docs/apps.md).
        `public=True`: anyone may call it through the gateway without a token
        (`POST /_functions/{app}/{name}`), rate-limited per client address; otherwise a caller needs
        a token that may invoke it, or, for another app, the grant `osless functions allow`.
        `retries` (0-10, default 2, as Lambda) and `max_age_s` (60-21600, default 3600) govern its
        async invocations: a failed one is tried again, with backoff, up to `retries` more times while
        younger than `max_age_s`, then it lands in the function's dead-letter queue."""
        if _fn is not None:
            raise UsageError(
                "@app.function needs parentheses: write @app.function() instead of @app.function"
            )
        _check_resources("@app.function", memory_mb, timeout_s)
        if not isinstance(http, bool):
            raise UsageError(f"@app.function(http={http!r}): give True or False")
        if not isinstance(public, bool):
            raise UsageError(f"@app.function(public={public!r}): give True or False")
        _check_async("@app.function", retries, max_age_s)

        def register(fn: F) -> F:
            if not callable(fn):
                raise UsageError(f"@app.function() decorates a function, not {type(fn).__name__}")
            fname = name or fn.__name__
            if not FUNCTION_RE.fullmatch(fname):
                raise UsageError(f"invalid function name {fname!r}: use letters, digits and '_'")
            if fname in self.functions:
                raise UsageError(
                    f"app {self.name!r} already has a function named {fname!r}; "
                    "rename one of them or pass @app.function(name=...)"
                )
            params = [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
            if len(params) < 2 and not any(
                p.kind is p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values()
            ):
                raise UsageError(
                    f"function {fname!r} must accept (event, ctx); "
                    f"it takes {len(params)} positional arguments"
                )
            self.functions[fname] = FunctionSpec(
                name=fname,
                handler=fn,
                memory_mb=memory_mb,
                timeout_s=timeout_s,
                is_async=inspect.iscoroutinefunction(fn),
                http=http,
                public=public,
                retries=retries,
                max_age_s=max_age_s,
            )
            return fn

        return register

    def schedule(
        self,
        cron: str | None = None,
        *,
        every: timedelta | None = None,
        tz: str = "UTC",
        catch_up: bool = False,
        name: str | None = None,
        memory_mb: int = 256,
        timeout_s: float = 30.0,
        retries: int = DEFAULT_RETRIES,
        max_age_s: int = DEFAULT_MAX_AGE_S,
    ) -> Callable[[F], F]:
        """Run `handler(ctx)` on a schedule: `@app.schedule("*/5 * * * *", tz="Europe/Paris")` (five
        cron fields, or six with seconds last) or `@app.schedule(every=timedelta(minutes=5))`.

        Each tick runs once across the platform, as an async invocation of the function of the same
        name (so `retries` and `max_age_s` as for `@app.function`). A tick missed while the platform
        was down runs once when it is back with `catch_up=True`; it is skipped otherwise."""
        if callable(cron):
            raise UsageError(
                '@app.schedule needs its schedule: write @app.schedule("*/5 * * * *") or '
                "@app.schedule(every=timedelta(minutes=5))"
            )
        if (cron is None) == (every is None):
            raise UsageError("@app.schedule takes exactly one of a cron expression and every=timedelta(...)")
        every_s: int | None = None
        if cron is not None:
            if not isinstance(cron, str) or len(cron.split()) not in (5, 6) or len(cron) > 200:
                raise UsageError(
                    f"@app.schedule({cron!r}): give a cron expression of 5 fields "
                    "(minute hour day month weekday, e.g. '*/5 * * * *') or 6 (seconds last)"
                )
        elif not isinstance(every, timedelta) or every.total_seconds() < 1 or every.total_seconds() % 1:
            raise UsageError(
                f"@app.schedule(every={every!r}): give a timedelta of whole seconds, 1 s or more"
            )
        else:
            every_s = int(every.total_seconds())
            if every_s > MAX_EVERY_S:
                raise UsageError(f"@app.schedule(every={every!r}): at most {MAX_EVERY_S // 86400} days")
        if not isinstance(tz, str) or not TZ_RE.fullmatch(tz):
            raise UsageError(f"@app.schedule(tz={tz!r}): give an IANA time zone such as 'Europe/Paris'")
        if not isinstance(catch_up, bool):
            raise UsageError(f"@app.schedule(catch_up={catch_up!r}): give True or False")

        def register(fn: F) -> F:
            if not callable(fn):
                raise UsageError(f"@app.schedule() decorates a function, not {type(fn).__name__}")
            sname = name or fn.__name__
            if inspect.iscoroutinefunction(fn):

                async def arun(event: Any, ctx: Any) -> Any:
                    return await fn(ctx)

                runner: Callable[..., Any] = arun
            else:

                def run(event: Any, ctx: Any) -> Any:
                    return fn(ctx)

                runner = run
            runner.__name__ = sname
            self.function(
                name=sname, memory_mb=memory_mb, timeout_s=timeout_s, retries=retries, max_age_s=max_age_s
            )(runner)
            self.schedules[sname] = ScheduleSpec(sname, cron, every_s, tz, catch_up)
            return fn

        return register

    def on_message(
        self,
        queue: str,
        *,
        batch_size: int = 1,
        max_concurrency: int = 10,
        visibility_timeout_s: int = DEFAULT_VISIBILITY_S,
        retries: int = DEFAULT_RETRIES,
        memory_mb: int = 256,
        name: str | None = None,
    ) -> Callable[[F], F]:
        """Consume the queue `{app}.{queue}` (created with the release): `def handler(messages, ctx)`,
        sync or async, gets up to `batch_size` `osless.Message`s at once. It returns: they are done.
        It raises, or runs past `visibility_timeout_s`: the whole batch is tried again, each message up
        to `retries` more times, then it goes to the queue's dead-letter queue with its error.
        `raise osless.BatchFailed([ids])` (or return `{"failed": [ids]}`): only those are tried again.
        At most `max_concurrency` batches are handled at once, across the platform."""
        if not isinstance(queue, str) or not QUEUE_RE.fullmatch(queue):
            raise UsageError(
                f"@app.on_message({queue!r}): name the queue with 1-63 lowercase letters, digits, '_' "
                "and '-', starting with a letter (for example 'orders')"
            )
        for arg, value, most in (
            ("batch_size", batch_size, MAX_BATCH_SIZE),
            ("max_concurrency", max_concurrency, MAX_CONSUMER_CONCURRENCY),
            ("visibility_timeout_s", visibility_timeout_s, 3600),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise UsageError(f"@app.on_message({arg}={value!r}): give a whole number from 1 to {most}")
        _check_async("@app.on_message", retries, DEFAULT_MAX_AGE_S)
        _check_resources("@app.on_message", memory_mb, visibility_timeout_s)

        def register(fn: F) -> F:
            if not callable(fn):
                raise UsageError(f"@app.on_message() decorates a function, not {type(fn).__name__}")
            fname = name or fn.__name__
            if any(c.queue == queue for c in self.consumers.values()):
                raise UsageError(
                    f"app {self.name!r} already has a consumer of queue {queue!r}; one per queue"
                )
            self.function(name=fname, memory_mb=memory_mb, timeout_s=visibility_timeout_s, retries=retries)(
                consumer_entry(fn)
            )
            self.consumers[fname] = ConsumerSpec(
                fname, queue, batch_size, max_concurrency, visibility_timeout_s, retries
            )
            return fn

        return register

    def web(
        self,
        _fn: Callable[..., Any] | None = None,
        *,
        memory_mb: int = 256,
        timeout_s: float = 60.0,
        max_duration_s: float = 3600.0,
    ) -> Callable[[F], F]:
        """Register a factory that returns the app's ASGI or WSGI application.

        `timeout_s` bounds the wait for each byte of an answer (the first, and each of a stream);
        `max_duration_s` the whole life of a request, streams and websockets included.
        """
        if _fn is not None:
            raise UsageError("@app.web needs parentheses: write @app.web() instead of @app.web")
        _check_resources("@app.web", memory_mb, timeout_s)
        _check_seconds("@app.web", "max_duration_s", max_duration_s, 86_400)

        def register(fn: F) -> F:
            if not callable(fn):
                raise UsageError(f"@app.web() decorates a function returning an ASGI/WSGI app, not {fn!r}")
            if self.web_spec is not None:
                raise UsageError(
                    f"app {self.name!r} already has a web app ({self.web_spec.name}); an app has at most one"
                )
            self.web_spec = WebSpec(fn.__name__, fn, memory_mb, timeout_s, float(max_duration_s))
            return fn

        return register

    def config(self, **fields: type[Any] | Field) -> Settings:
        """Declare what the app can be told, once: `settings = app.config(greeting=str, n=osless.Field(int))`.

        Each value is a type (str, int, float, bool, osless.JSON, osless.Secret) or an osless.Field;
        `settings.greeting` then reads the current value.
        """
        if self.settings is not None:
            raise UsageError(
                f"app {self.name!r} already declared its config; declare all keys in one app.config(...) call"
            )
        self.settings = Settings(self.name, check_fields(self.name, fields))
        return self.settings

    @overload
    def on_config_change(self, fn: H, /) -> H: ...

    @overload
    def on_config_change(self, fn: None = None, /) -> Callable[[H], H]: ...

    def on_config_change(self, fn: H | None = None, /) -> H | Callable[[H], H]:
        """Register `hook(changed)`, called in each instance after a change with {key: new value}."""

        def register(hook: H) -> H:
            if not callable(hook):
                raise UsageError(f"@app.on_config_change decorates a function, not {type(hook).__name__}")
            self.config_hooks.append(hook)
            return hook

        return register if fn is None else register(fn)

    def manifest(self) -> dict[str, Any]:
        """What the platform needs to know without running the app: names and resources."""
        out = {
            "name": self.name,
            "functions": {n: f.manifest() for n, f in sorted(self.functions.items())},
            "web": self.web_spec.manifest() if self.web_spec else None,
            "volumes": {path: _volume(v).manifest() for path, v in sorted(self.volumes.items())},
            "egress": sorted(self.egress),
            "config": self.settings.manifest() if self.settings is not None else {},
        }
        # Steps and schedules only when given: the manifests of apps without them stay as they were.
        if self.schedules:
            out["schedules"] = {n: sc.manifest() for n, sc in sorted(self.schedules.items())}
        if self.release:
            out["release"] = list(self.release)
        if self.build:
            out["build"] = list(self.build)
        if self.consumers:  # only when used, as the steps above
            out["consumers"] = {n: c.manifest() for n, c in sorted(self.consumers.items())}
        return out


def memory_ok(memory_mb: object) -> bool:
    return (
        isinstance(memory_mb, int)
        and not isinstance(memory_mb, bool)
        and MIN_MEMORY_MB <= memory_mb <= MAX_MEMORY_MB
    )


def _check_resources(where: str, memory_mb: int, timeout_s: float) -> None:
    if not memory_ok(memory_mb):
        raise UsageError(
            f"{where}(memory_mb={memory_mb!r}): give an int between {MIN_MEMORY_MB} and {MAX_MEMORY_MB}"
        )
    _check_seconds(where, "timeout_s", timeout_s, 3600)


def _check_async(where: str, retries: object, max_age_s: object) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise UsageError(f"{where}(retries={retries!r}): give a whole number from 0 to {MAX_RETRIES}")
    if (
        isinstance(max_age_s, bool)
        or not isinstance(max_age_s, int)
        or not MIN_MAX_AGE_S <= max_age_s <= MAX_MAX_AGE_S
    ):
        raise UsageError(
            f"{where}(max_age_s={max_age_s!r}): give whole seconds from {MIN_MAX_AGE_S} to {MAX_MAX_AGE_S}"
        )


def _check_seconds(where: str, name: str, value: float, most: int) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= most:
        raise UsageError(f"{where}({name}={value!r}): give a number of seconds in (0, {most}]")


def _check_volumes(volumes: object) -> dict[str, Volume]:
    if not isinstance(volumes, Mapping):
        raise UsageError(
            'App(volumes=...) takes a dict of {"/path/inside": osless.Volume("name", size_mb=...)}; '
            f"a plain name string gets {DEFAULT_VOLUME_MB} MB"
        )
    out: dict[str, Volume] = {}
    sizes: dict[str, int] = {}
    for path, given in volumes.items():
        if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
            raise UsageError(f"volume path {path!r} must be an absolute path such as '/data'")
        top = "/" + path.strip("/").split("/")[0]
        if path.rstrip("/") in RESERVED or top in RESERVED[1:]:
            raise UsageError(f"volume path {path!r} is reserved by the platform; use a path such as '/data'")
        if isinstance(given, str):
            given = Volume(given)
        if not isinstance(given, Volume):
            raise UsageError(
                f'the volume at {path!r} is {given!r}: give osless.Volume("name", size_mb=...) '
                "or a volume name"
            )
        if sizes.setdefault(given.name, given.size_mb) != given.size_mb:
            raise UsageError(
                f"volume {given.name!r} is declared with two sizes ({sizes[given.name]} and "
                f"{given.size_mb} MB); give it one size_mb wherever it is mounted"
            )
        out[path] = given
    return out


def _volume(given: Volume | str) -> Volume:
    return given if isinstance(given, Volume) else Volume(given)


def read_volumes(raw: object) -> dict[str, Volume]:
    """The volumes of a stored manifest, checked again: the manifest was printed by the app's own
    process, and releases built before sizes existed hold plain names (`{"/data": "name"}`)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise UsageError(f"the manifest's volumes are {type(raw).__name__}, not a mapping")
    given: dict[str, Volume | str] = {}
    for path, v in raw.items():
        if isinstance(v, Mapping):
            if set(v) != {"name", "size_mb"}:
                raise UsageError(f"the manifest's volume at {path!r} needs exactly a name and a size_mb")
            given[path] = Volume(v["name"], size_mb=v["size_mb"])
        else:
            given[path] = v
    return _check_volumes(given)


def read_app_manifest(raw: object) -> dict[str, Any]:
    """The app's part of a manifest (`App.manifest()`), checked as the SDK checks what it is given:
    at build time it is printed by the app's own process, which may print anything it likes."""
    if not isinstance(raw, Mapping):
        raise UsageError(f"the app's manifest is {type(raw).__name__}, not a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid app name {str(name)[:50]!r}")
    functions = raw.get("functions") or {}
    if not isinstance(functions, Mapping):
        raise UsageError("the manifest's functions are not a mapping")
    checked: dict[str, Any] = {}
    for fn, spec in functions.items():
        if not isinstance(fn, str) or not FUNCTION_RE.fullmatch(fn):
            raise UsageError(f"function name {str(fn)[:50]!r} is not a name of letters, digits and _")
        keys = {"memory_mb", "timeout_s", "async"}
        optional = {"http", "public", "retries", "max_age_s"}
        if not isinstance(spec, Mapping) or not keys <= set(spec) <= keys | optional:
            raise UsageError(
                f"function {fn!r} needs exactly memory_mb, timeout_s and async "
                "(and http, public, retries, max_age_s)"
            )
        _check_resources(f"@app.function {fn}", spec["memory_mb"], spec["timeout_s"])
        _check_async(
            f"@app.function {fn}",
            spec.get("retries", DEFAULT_RETRIES),
            spec.get("max_age_s", DEFAULT_MAX_AGE_S),
        )
        if not isinstance(spec["async"], bool) or not isinstance(spec.get("public", False), bool):
            raise UsageError(f"function {fn!r}: async and public must be true or false")
        if spec.get("http", True) is not True:
            raise UsageError(f"function {fn!r}: http is true or absent")
        checked[fn] = dict(spec)
    web = raw.get("web")
    if web is not None:
        keys = {"name", "memory_mb", "timeout_s", "max_duration_s"}
        if not isinstance(web, Mapping) or not keys <= set(web) <= keys | {"kind"}:
            raise UsageError(
                "the web app needs exactly name, memory_mb, timeout_s, max_duration_s (and kind)"
            )
        if web.get("kind", "asgi") not in ("asgi", "wsgi"):
            raise UsageError(f"web app kind {str(web['kind'])[:20]!r} is neither asgi nor wsgi")
        if not isinstance(web["name"], str) or not FUNCTION_RE.fullmatch(web["name"]):
            raise UsageError(f"web app name {str(web['name'])[:50]!r} is not a Python identifier")
        _check_resources("@app.web", web["memory_mb"], web["timeout_s"])
        _check_seconds("@app.web", "max_duration_s", web["max_duration_s"], 86_400)
        web = dict(web)
    return {
        "name": name,
        "functions": checked,
        "web": web,
        "volumes": {path: v.manifest() for path, v in read_volumes(raw.get("volumes")).items()},
        "egress": _check_egress(raw.get("egress") or []),
        "release": _check_release(raw.get("release") or []),
        "config": read_schema(raw.get("config") or {}),
        "build": _check_build(raw.get("build") or []),
        **(
            {"schedules": schedules} if (schedules := _check_schedules(raw.get("schedules"), checked)) else {}
        ),
        "consumers": _check_consumers(raw.get("consumers") or {}, checked),
    }


def _check_schedules(raw: object, functions: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's schedules, in shape: each one names a function; the expression and the zone
    are the builder's to check (`osless.schedules.check`, with croniter)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or len(raw) > MAX_SCHEDULES:
        raise UsageError(f"the manifest's schedules are not a mapping of at most {MAX_SCHEDULES}")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or name not in functions:
            raise UsageError(f"schedule {str(name)[:50]!r} names no function of the app")
        keys = {"tz", "catch_up"}
        if not isinstance(spec, Mapping) or set(spec) not in (keys | {"cron"}, keys | {"every_s"}):
            raise UsageError(f"schedule {name!r} needs exactly cron or every_s, tz and catch_up")
        if not isinstance(spec["tz"], str) or not TZ_RE.fullmatch(spec["tz"]):
            raise UsageError(f"schedule {name!r}: tz {str(spec['tz'])[:64]!r} is not a time zone's name")
        if not isinstance(spec["catch_up"], bool):
            raise UsageError(f"schedule {name!r}: catch_up is true or false")
        out[name] = dict(spec)
    return out


def _check_consumers(raw: object, functions: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's consumers: each a function of the app, one per queue, in the SDK's bounds."""
    if not isinstance(raw, Mapping):
        raise UsageError("the manifest's consumers are not a mapping")
    out: dict[str, Any] = {}
    queues: set[str] = set()
    keys = {"queue", "batch_size", "max_concurrency", "visibility_timeout_s", "retries"}
    for fn, spec in raw.items():
        if fn not in functions or not isinstance(spec, Mapping) or set(spec) != keys:
            raise UsageError(
                f"consumer {str(fn)[:50]!r} needs a function of its name and exactly {sorted(keys)}"
            )
        if (
            not isinstance(spec["queue"], str)
            or not QUEUE_RE.fullmatch(spec["queue"])
            or spec["queue"] in queues
        ):
            raise UsageError(f"consumer {fn!r}: queue {str(spec['queue'])[:70]!r} is not a name, or has two")
        queues.add(spec["queue"])
        for arg, most in (("batch_size", MAX_BATCH_SIZE), ("max_concurrency", MAX_CONSUMER_CONCURRENCY)):
            value = spec[arg]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise UsageError(f"consumer {fn!r}: {arg} is a whole number from 1 to {most}")
        _check_async(f"@app.on_message {fn}", spec["retries"], DEFAULT_MAX_AGE_S)
        _check_seconds(f"@app.on_message {fn}", "visibility_timeout_s", spec["visibility_timeout_s"], 3600)
        out[str(fn)] = dict(spec)
    return out


MAX_RELEASE_COMMANDS, RELEASE_COMMAND_CHARS = 10, 4096  # as `osless.contracts` holds a manifest to


def _check_release(commands: object) -> list[str]:
    return _check_steps("release", commands, MAX_RELEASE_COMMANDS, RELEASE_COMMAND_CHARS)


def _check_build(commands: object) -> list[str]:
    return _check_steps("build", commands, MAX_BUILD_STEPS, MAX_BUILD_STEP_CHARS)


def _check_steps(kind: str, commands: object, most: int, chars: int) -> list[str]:
    """Build and release steps alike: shell command lines (each runs as `/bin/sh -c COMMAND`)."""
    example = {"build": "python manage.py collectstatic --noinput", "release": "python manage.py migrate"}[
        kind
    ]
    if isinstance(commands, str) or not isinstance(commands, list | tuple):
        raise UsageError(f"App({kind}=...) takes a list of shell commands, such as [{example!r}]")
    if len(commands) > most:
        raise UsageError(f"App({kind}=...) has {len(commands)} commands; give at most {most}")
    for command in commands:
        if not isinstance(command, str) or not command.strip():
            raise UsageError(f"App({kind}=...): each command is a non-empty string, such as {example!r}")
        if len(command) > chars or "\0" in command:
            raise UsageError(
                f"App({kind}=...) command {command[:50]!r}... must be at most {chars} characters, "
                "without NUL; put a long one in a script of the app and run that"
            )
    return list(commands)


def _check_egress(hosts: object) -> list[str]:
    if not isinstance(hosts, list | tuple) or not all(isinstance(h, str) for h in hosts):
        raise UsageError('App(egress=...) takes a list of host names, such as ["api.example.com"]')
    for host in hosts:
        if not HOST_RE.fullmatch(host):
            raise UsageError(
                f"egress host {host!r} must be a host name such as 'api.example.com' or "
                "'*.example.com' (no scheme, port or path)"
            )
    return list(hosts)
