"""Who is calling and what they may do: bearer tokens, their roles, and the one permission matrix.

Tokens are stored by their sha256 (`/tokens/{digest}`), never in clear; a token's id is the first
12 hex digits of that digest. App tokens (`osla_...`, api/secrets.py) are derived, never stored.
The guard (api/guard.py) authenticates every request before routing; each route then declares the
permission it needs with `require(...)`, checked against `ROLES` below.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal, get_args

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from osless import tokens
from osless.api import grants
from osless.api.errors import ApiError
from osless.api.models import now
from osless.api.resources import Resources
from osless.store import Conflict, Store

__all__ = [
    "FUNCTION_GRANT_PATTERN",
    "GATEWAY_PREFIX",
    "GRANTABLE",
    "NODE_PREFIX",
    "PLATFORM_ROLES",
    "ROLES",
    "ROUTINE",
    "Caller",
    "Grantable",
    "Permission",
    "Require",
    "TokenRecord",
    "Tokens",
    "check_invoke",
    "check_node",
    "check_scope",
    "issue_token",
    "node_of",
    "require",
    "token_digest",
]

log = logging.getLogger("osless.api.auth")

Permission = Literal[
    "whoami",
    "describe",
    "read",
    "logs",
    "deploy",
    "invoke",
    "egress",
    "operate",
    "report",
    "route",
    "build",
    "pull",
    "secrets",
    "admin",
    "volumes",
    "debug",
    "sample",
]

_READ: frozenset[Permission] = frozenset({"whoami", "describe", "read"})

# The permission matrix. `describe` is an app's config (secrets masked), schema and endpoints: what
# an app's own token may read of itself. The platform's parts each hold a role of their own, with
# only what they need:
# - `operate`: the controllers' writes (instances placed and removed, the autoscaler's `desired`);
# - `egress`: a node's egress proxy calls another app's function for an app placed on that node,
#   with that app's identity (api/routes/functions.py); the callee's grants decide;
# - `report`: a node's writes about itself (heartbeat, instance status, egress calls, its gateway's
#   token), checked against the node the token was made for (`node_of`);
# - `route`: a gateway's (wake an app at zero, traffic reports);
# - `build`: a builder process's (claim a queued deploy, read its source, post its log, layers,
#   image and result), only ever on the deploys it claimed (api/routes/builds.py);
# - `pull`: images and layer archives by digest (a node, only those it runs; see routes/images.py);
# - `secrets`: config in clear, for node agents only, and only for the apps placed on their node.
ROLES: dict[str, frozenset[Permission]] = {
    "admin": _READ
    | {"logs", "deploy", "invoke", "egress", "operate", "report", "route", "pull", "admin", "debug"},
    "deploy": _READ | {"deploy", "invoke"},
    "read": _READ,
    # `debug`: an instance's stacks and profiles (`osless debug`, api/routes/debug.py), audited.
    "debug": _READ | {"logs", "debug"},
    "invoke": frozenset({"whoami", "invoke"}),
    # A node agent: `osless node join` (and `osless up`'s own node) runs with one, named `node:NAME`.
    "node": _READ | {"report", "pull", "secrets", "egress"},
    # A node's gateway processes, with a token their node asks for (`POST /v1/nodes/{node}/gateway-token`).
    "gateway": _READ | {"route"},
    # The scheduler and the autoscaler.
    "controller": _READ | {"operate"},
    # A builder process (`osless builder`): no read, no secrets; only the deploys it claimed.
    "builder": frozenset({"whoami", "build"}),
    # An app's own token, scoped to that app.
    "app": frozenset({"whoami", "describe"}),
    # What the API shows another part for one request of its own (`secrets.scoped_token`), never its
    # caller's token: `reader` to a node for an app's logs (the node API checks it was made for it;
    # the API's own logs route refuses it, so a node cannot renew it), `invoker` to a gateway.
    "reader": _READ | {"logs"},
    "invoker": frozenset({"whoami", "invoke"}),
    # `volumes` to a node, for the files of an app's volumes on it (`osless volumes`): no route of the
    # API needs that permission, so the node can do nothing with it but what the API asked.
    "volumes": frozenset({"whoami", "volumes"}),
    # Shown to a node for one command of an app (`osless run`, a release step: `api.runs`): the node
    # API checks it was made for it; it opens nothing of the API.
    "runner": frozenset({"whoami"}),
    # Shown to a node for one stack or profile of an instance (api/routes/debug.py): `sample`, which
    # no route of the API needs, so it opens nothing there.
    "debugger": frozenset({"whoami", "sample"}),
    # Another server (`secrets.peer_token`): what it lacks of images and deploy sources, nothing else.
    "peer": frozenset({"pull"}),
}
# The platform's own parts: never throttled, and their routine writes are not audited (they would
# drown what people did).
PLATFORM_ROLES = frozenset({"node", "gateway", "controller", "builder", "peer"})
# `egress`: an app's calls of other apps' functions are the data plane, like the gateway's (counted
# per node in `/calls/{node}`, who called whom), not people's acts.
ROUTINE: frozenset[Permission] = frozenset({"operate", "report", "route", "build", "pull", "egress"})
NODE_PREFIX = "node:"
GATEWAY_PREFIX = "gateway:"
# What `POST /v1/tokens` makes; a node token is what `osless node join` runs with.
Grantable = Literal["admin", "deploy", "read", "debug", "invoke", "node", "controller", "builder"]
GRANTABLE: tuple[str, ...] = get_args(Grantable)
TOKEN_PREFIX = tokens.PLAIN
ID_LEN = 12
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$"
# What an invoke token may be limited to: `APP.FUNCTION`, or `APP.*` for every function of APP.
FUNCTION_GRANT_PATTERN = r"^([a-z]|[a-z][a-z0-9-]{0,38}[a-z0-9])\.(\*|[A-Za-z_][A-Za-z0-9_]{0,63})$"
MAX_FUNCTION_GRANTS = 64


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRecord(BaseModel):
    """What is stored of a token (under its digest)."""

    name: str
    role: str
    app: str | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    last_used_at: float | None = None
    # `APP.FUNCTION` or `APP.*`: the functions it may invoke; None (records made before) for any.
    functions: list[str] | None = None

    def expired(self, at: float | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (at if at is not None else now())


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from, as the guard found it."""

    id: str  # the token's id, or "app:NAME" for an app's own token
    name: str
    role: str
    app: str | None = None  # set: the caller may act on this app only
    expires_at: float | None = None
    functions: tuple[str, ...] | None = None  # set: the only functions it may invoke (`APP.FN`, `APP.*`)

    def may(self, permission: Permission) -> bool:
        return permission in ROLES.get(self.role, frozenset())

    def sees(self, app: str | None) -> bool:
        """Whether something of `app` concerns this caller (app-less things concern unscoped callers)."""
        return self.app is None or app == self.app


class Tokens:
    """The stored tokens, with a short cache in front: the platform's parts call many times a second.

    A cached answer lives `ttl_s`, so a token revoked elsewhere stops working within that; one revoked
    through this process stops at once. Unknown tokens are cached too, in the same bounded LRU, so a
    flood of made-up ones costs one store read each per `ttl_s` and no memory past `size`.
    """

    def __init__(self, store: Store, *, ttl_s: float = 1.0, size: int = 4096) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.size = size
        self._cache: OrderedDict[str, tuple[float, TokenRecord | None]] = OrderedDict()
        self._used: dict[str, float] = {}  # digest -> last use, flushed to the store now and then
        self._flushed: dict[str, float] = {}

    async def issue(
        self,
        name: str,
        role: str,
        *,
        app: str | None = None,
        expires_at: float | None = None,
        functions: list[str] | None = None,
    ) -> tuple[str, str, TokenRecord]:
        """A new token: (the token, its digest, its record). The token itself is never stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(token)
        record = TokenRecord(
            name=name, role=role, app=app, created_at=now(), expires_at=expires_at, functions=functions
        )
        await self.store.put(f"/tokens/{digest}", record.model_dump_json().encode(), if_revision=0)
        return token, digest, record

    async def lookup(self, token: str) -> tuple[str, TokenRecord] | None:
        """(digest, record) of a stored token, expired ones included; None if it is unknown."""
        digest = token_digest(token)
        at = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and at - cached[0] < self.ttl_s:
            self._cache.move_to_end(digest)
            record = cached[1]
        else:
            record = await self._read(digest)
            self._cache[digest] = (at, record)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return None if record is None else (digest, record)

    async def _read(self, digest: str) -> TokenRecord | None:
        kv = await self.store.get(f"/tokens/{digest}")
        if kv is None:
            return None
        try:
            return TokenRecord.model_validate_json(kv.value)
        except ValidationError:
            log.warning("token %s has an unreadable record; refusing it", digest[:ID_LEN])
            return None

    def touch(self, digest: str) -> None:
        self._used[digest] = now()

    def last_used(self, digest: str) -> float | None:
        return self._used.get(digest)

    async def list(self) -> list[tuple[str, TokenRecord]]:
        """(digest, record) of every stored token."""
        items, _ = await self.store.list("/tokens/")
        out = []
        for kv in items:
            try:
                out.append((kv.key.rsplit("/", 1)[1], TokenRecord.model_validate_json(kv.value)))
            except ValidationError:
                continue
        return out

    async def find(self, token_id: str) -> tuple[str, TokenRecord] | None:
        if not re.fullmatch(f"[0-9a-f]{{{ID_LEN}}}", token_id):
            return None
        return next(((d, r) for d, r in await self.list() if d.startswith(token_id)), None)

    async def revoke(self, digest: str) -> bool:
        gone = await self.store.delete(f"/tokens/{digest}")
        self._cache.pop(digest, None)
        self._used.pop(digest, None)
        return gone

    async def flush_last_used(self) -> None:
        """Write the last use of each token used since the previous flush (compare-and-swap: a token
        revoked meanwhile must not come back)."""
        for digest, at in list(self._used.items()):
            if self._flushed.get(digest) == at:
                continue
            kv = await self.store.get(f"/tokens/{digest}")
            if kv is None:
                self._used.pop(digest, None)
                continue
            info = json.loads(kv.value)
            info["last_used_at"] = at
            try:
                await self.store.put(kv.key, json.dumps(info).encode(), if_revision=kv.mod_revision)
                self._flushed[digest] = at
            except Conflict:
                continue  # changed meanwhile: the next flush tries again
        for digest in set(self._flushed) - set(self._used):
            del self._flushed[digest]

    async def collect_expired(self, grace_s: float) -> int:
        """Delete tokens expired more than `grace_s` ago (until then they answer "token expired")."""
        cutoff = now() - grace_s
        old = [d for d, r in await self.list() if r.expires_at is not None and r.expires_at < cutoff]
        await asyncio.gather(*(self.revoke(d) for d in old))
        return len(old)


async def issue_token(resources: Resources, name: str, role: str = "admin") -> str:
    token, _, _ = await Tokens(resources.store).issue(name, role)
    return token


class Require:
    """A route's dependency: the caller holds `permission`, and an app-scoped caller only reaches its
    own app. Routes without an `{app}` in their path refuse app-scoped callers unless they `narrow`
    what they answer to the caller's app themselves (with `Caller.sees`)."""

    def __init__(self, permission: Permission, narrows: bool) -> None:
        self.permission = permission
        self.narrows = narrows

    async def __call__(self, request: Request) -> Caller:
        caller: Caller | None = request.scope.get("osless.caller")
        if caller is None:  # only reachable if the guard were taken away: refuse, never allow
            raise ApiError(401, "unauthorized", "not authenticated", headers={"www-authenticate": "Bearer"})
        request.scope["osless.permission"] = self.permission  # the guard's audit reads it
        if not caller.may(self.permission):
            roles = ", ".join(r for r, p in ROLES.items() if self.permission in p and r in GRANTABLE)
            raise ApiError(
                403,
                "forbidden",
                f"this needs the {self.permission!r} permission, which a {caller.role!r} token lacks "
                f"(roles that have it: {roles}); `osless tokens create --role ROLE` makes one",
            )
        if caller.app is not None:
            app = request.path_params.get("app")
            if (app is None and not self.narrows) or (app is not None and app != caller.app):
                raise ApiError(
                    403,
                    "forbidden",
                    f"this token is limited to app {caller.app!r}: it cannot reach "
                    f"{'app ' + repr(app) if app else 'this path'}",
                )
        return caller


def require(permission: Permission, *, narrows: bool = False) -> Any:
    """`caller: Caller = require("deploy")` in a route's signature."""
    return Depends(Require(permission, narrows))


def check_scope(caller: Caller, app: str | None) -> None:
    """For routes that find the app only in what they load (a deploy, an instance)."""
    if not caller.sees(app):
        raise ApiError(403, "forbidden", f"this token is limited to app {caller.app!r}")


def node_of(caller: Caller) -> str | None:
    """The node a node or gateway token was made for (its name is `node:NAME` or `gateway:NAME`)."""
    for role, prefix in (("node", NODE_PREFIX), ("gateway", GATEWAY_PREFIX)):
        if caller.role == role and caller.name.startswith(prefix):
            return caller.name[len(prefix) :]
    return None


def check_node(caller: Caller, node: str) -> None:
    """A node's token acts for its own node only; other roles that reach the route act for any."""
    if caller.role not in ("node", "gateway"):
        return
    mine = node_of(caller)
    if mine != node:
        raise ApiError(
            403,
            "not_this_node",
            f"this token is node {mine!r}'s: it cannot act for node {node!r}"
            if mine
            else f"this {caller.role} token is not named after a node ({caller.role}:NAME): it acts for none",
        )


def grant_covers(grants: tuple[str, ...] | list[str], app: str, function: str) -> bool:
    """Whether an invoke token's `APP.FUNCTION` / `APP.*` list covers `app.function`."""
    return f"{app}.{function}" in grants or f"{app}.*" in grants


async def check_invoke(store: Store, caller: Caller, app: str, function: str) -> None:
    """The one check every way of invoking a function makes, after `require("invoke")` (or, for an
    app calling through its node's egress proxy, the node's `egress`): 403 `not_allowed` saying
    what is missing and how to grant it. A token limited to some functions invokes those only; an
    app calling with its own identity (role `app`, `app` its name) needs the callee's grant."""
    target = f"{app}.{function}"
    if caller.functions is not None and not grant_covers(caller.functions, app, function):
        held = ", ".join(caller.functions) or "none"
        raise ApiError(
            403,
            "not_allowed",
            f"token {caller.name!r} may not invoke {target} (it may invoke: {held}); make one that may "
            f"with `osless tokens create --role invoke --functions {target}`",
        )
    calling = caller.app if caller.role == "app" else None
    if calling is not None and calling != app and not await grants.allowed(store, app, function, calling):
        raise ApiError(
            403,
            "not_allowed",
            f"app {calling} may not call {target}; grant it with "
            f"`osless functions allow {target} --app {calling}`",
        )
