"""An app's configuration: typed by the schema in its code, set here, pushed live by the node agents.

Every change is a new version with who and when; secrets are encrypted at rest and shown masked.
Only a node token reads them in clear (`/v1/nodes/{node}/apps/{app}/config`), to hand them to the
app's own instances: the token of that node, and only for the apps with an instance placed on it.
"""

from __future__ import annotations

import asyncio
import random
import weakref
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Query

from osless.api.auth import Caller, check_node, require
from osless.api.errors import ApiError, responses
from osless.api.models import (
    ConfigChange,
    ConfigHistory,
    ConfigPatch,
    ConfigRollback,
    ConfigSchemaView,
    ConfigState,
    ConfigView,
    NodeConfig,
    NodeConfigList,
    now,
)
from osless.api.openapi import WATCHABLE
from osless.api.resources import Resources
from osless.api.schema import MASK, coerce, misfits
from osless.api.state import ApiState, get_state
from osless.api.watch import list_or_watch
from osless.store import Conflict

router = APIRouter(tags=["config"])


async def app_schema(state: ApiState, app: str) -> dict[str, dict[str, Any]]:
    """The config schema of the app's current release."""
    a = await state.resources.get_app(app)
    if a.current_release is None:
        raise ApiError(
            409,
            "not_deployed",
            f"app {app!r} has no release yet: its config schema comes with its code, so deploy it first",
        )
    release = await state.resources.get_release(app, a.current_release)
    return release.manifest.config_schema()


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"$secret"}


def masked(values: dict[str, Any]) -> dict[str, Any]:
    return {k: MASK if is_secret(v) else v for k, v in sorted(values.items())}


def reveal(state: ApiState, values: dict[str, Any]) -> dict[str, Any]:
    return {k: state.secrets.decrypt(v["$secret"]) if is_secret(v) else v for k, v in values.items()}


def _view(cfg: ConfigState, schema: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "app": cfg.app,
        "version": cfg.version,
        "values": masked(cfg.values),
        "schema": schema,
        "updated_at": cfg.updated_at,
        "updated_by": cfg.updated_by,
    }


@router.get(
    "/apps/{app}/config",
    response_model=ConfigView,
    responses=responses(404, 409),
    summary="The app's config (secrets masked) and its schema",
)
async def get_config(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("describe")
) -> dict[str, Any]:
    schema = await app_schema(state, app)
    cfg, _ = await state.resources.get_config(app)
    return _view(cfg, schema)


@router.get(
    "/apps/{app}/config/schema",
    response_model=ConfigSchemaView,
    responses=responses(404, 409),
    summary="What the app's code declares it can be told",
)
async def get_schema(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("describe")
) -> dict[str, Any]:
    return {"app": app, "schema": await app_schema(state, app)}


@router.patch(
    "/apps/{app}/config",
    response_model=ConfigView,
    responses=responses(404, 409, 503),
    summary="Set and unset keys; `revision` makes it compare-and-swap",
)
async def patch_config(
    app: str,
    body: ConfigPatch,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> dict[str, Any]:
    # Read side by side: a change is pushed only once written, so every round trip here delays it.
    schema, current = await asyncio.gather(app_schema(state, app), state.resources.get_config(app))
    unknown = sorted((set(body.set) | set(body.unset)) - set(schema))
    if unknown:
        declared = ", ".join(sorted(schema)) or "nothing"
        raise ApiError(
            422,
            "unknown_key",
            f"{', '.join(unknown)}: not in the config schema of {app!r} "
            f"(it declares: {declared}); declare keys with app.config(...) in the code",
        )
    clash = sorted(set(body.set) & set(body.unset))
    if clash:
        raise ApiError(422, "invalid_request", f"{', '.join(clash)}: both set and unset")
    problems, stored = [], {}
    for key, value in body.set.items():
        try:
            coerced = coerce(key, schema[key], value)
        except ValueError as e:
            problems.append(str(e))
            continue
        secret = schema[key]["type"] == "secret"
        stored[key] = {"$secret": state.secrets.encrypt(coerced)} if secret else coerced
    if problems:
        raise ApiError(422, "invalid_value", "; ".join(problems))

    def apply(cfg: ConfigState) -> tuple[dict[str, Any], dict[str, Any]]:
        if body.revision is not None and body.revision != cfg.version:
            raise _stale(app, cfg.version, body.revision)
        values = {**cfg.values, **stored}
        changes: dict[str, Any] = {k: {"set": MASK if is_secret(v) else v} for k, v in stored.items()}
        for key in body.unset:
            if values.pop(key, None) is not None:
                changes[key] = {"unset": True}
        return values, changes

    return await _write(
        state,
        app,
        caller,
        apply,
        lambda changes: "set " + ", ".join(sorted(changes)),
        cas=body.revision is not None,
        current=current,
    )


def _stale(app: str, version: int, revision: int) -> ApiError:
    return ApiError(
        409,
        "stale_revision",
        f"the config of {app!r} is at version {version}, not {revision}: read it again, then retry",
    )


# A write without `revision` merges onto whatever is current: losing a race to another writer is no
# reason to fail it, so it is applied again to the newer values. Each round one writer wins.
WRITE_ATTEMPTS = 64


async def _write(
    state: ApiState,
    app: str,
    caller: Caller,
    apply: Callable[[ConfigState], tuple[dict[str, Any], dict[str, Any]]],
    describe: Callable[[dict[str, Any]], str],
    *,
    cas: bool = False,
    current: tuple[ConfigState, int] | None = None,
) -> dict[str, Any]:
    """Read the config (or take `current`, just read), `apply` the change (new values and what
    changed), commit; again on a conflict.

    With `cas` the caller named the version it had read, so a conflict means that it is stale: 409."""
    for attempt in range(WRITE_ATTEMPTS):
        cfg, rev = current if current is not None and attempt == 0 else await state.resources.get_config(app)
        values, changes = apply(cfg)
        if not changes:
            return _view(cfg, None)
        new = ConfigState(
            app=app, version=cfg.version + 1, values=values, updated_at=now(), updated_by=caller.name
        )
        change = ConfigChange(
            app=app,
            version=new.version,
            by=new.updated_by,
            description=describe(changes),
            changes=changes,
            values=values,
        )
        try:
            await state.resources.commit_config(new, rev, change)
            return _view(new, None)
        except Conflict:
            if cas:
                raise _stale(app, (await state.resources.get_config(app))[0].version, cfg.version) from None
            # Jitter, so that the writers who lost together do not meet again in step.
            await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))
    raise ApiError(
        503,
        "busy",
        f"the config of {app!r} changed {WRITE_ATTEMPTS} times while this write was being applied; try again",
        headers={"retry-after": "1"},
    )


@router.get(
    "/apps/{app}/config/history",
    response_model=ConfigHistory,
    responses=responses(404),
    summary="Every version of the app's config: who, when, what",
)
async def config_history(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, Any]:
    await state.resources.get_app(app)
    items = await state.resources.config_history(app)
    return {"items": [c.model_dump(exclude={"values"}) for c in sorted(items, key=lambda c: -c.version)]}


@router.post(
    "/apps/{app}/config/rollback",
    response_model=ConfigView,
    responses=responses(404, 409, 503),
    summary="Make an earlier version's values current again",
)
async def config_rollback(
    app: str,
    body: ConfigRollback,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> dict[str, Any]:
    schema = await app_schema(state, app)
    if body.to == 0:
        target: dict[str, Any] = {}  # version 0: before anything was set
    else:
        found = [c for c in await state.resources.config_history(app) if c.version == body.to]
        if not found:
            raise ApiError(
                404,
                "version_not_found",
                f"the config of {app!r} has no version {body.to}; `osless config history {app}` lists them",
            )
        target = found[0].values
    # Values refused as a PATCH would refuse them. Keys the current release does not declare come back
    # as they were, unread (a deploy keeps them too), so that rolling the code back finds them again.
    problems = [p for p in misfits(schema, _plain_types(target)) if not p.endswith("required and not set")]
    if problems:
        raise ApiError(
            422, "invalid_value", f"version {body.to} does not fit the current schema: " + "; ".join(problems)
        )

    def apply(cfg: ConfigState) -> tuple[dict[str, Any], dict[str, Any]]:
        _check_losses(app, schema, cfg.values, target, body)
        changes: dict[str, Any] = {}
        for key in sorted(set(target) | set(cfg.values)):
            if target.get(key) != cfg.values.get(key):
                if key not in target:
                    changes[key] = {"unset": True}
                else:
                    changes[key] = {"set": MASK if is_secret(target[key]) else target[key]}
        return dict(target), changes

    return await _write(state, app, caller, apply, lambda _: f"rollback to version {body.to}")


def _check_losses(
    app: str,
    schema: dict[str, dict[str, Any]],
    current: dict[str, Any],
    target: dict[str, Any],
    body: ConfigRollback,
) -> None:
    """A rollback never unsets what the current release requires, and drops secrets only when told to."""
    lost = sorted(k for k in current if k not in target)
    required = [k for k in lost if schema.get(k, {}).get("required")]
    if required:
        raise ApiError(
            409,
            "would_unset_required",
            f"version {body.to} has no value for {', '.join(required)}, which the current release of "
            f"{app!r} requires (declared without a default): roll back to a version that sets "
            f"{'it' if len(required) == 1 else 'them'} (`osless config history {app}` lists them), "
            f"or change keys one by one with `osless config set` and `osless config unset`",
        )
    secrets = [k for k in lost if is_secret(current[k])]
    if secrets and not body.drop_secrets:
        raise ApiError(
            409,
            "would_drop_secrets",
            f"version {body.to} has no value for the secret{'s' if len(secrets) > 1 else ''} "
            f"{', '.join(secrets)}, set now: a rollback drops secrets only when told to, with "
            f'{{"drop_secrets": true}} (`osless config rollback {app} --to {body.to} --drop-secrets`)',
        )


def _plain_types(values: dict[str, Any]) -> dict[str, Any]:
    """Stored values with each secret standing in as a string, for type checks that must not decrypt."""
    return {k: "secret" if is_secret(v) else v for k, v in values.items()}


def config_misfits(schema: dict[str, dict[str, Any]], cfg: ConfigState) -> tuple[list[str], list[str]]:
    """Checked before a deploy rolls out: stored values the new schema refuses (which stop the
    deploy), and required keys not set yet (which it only reports: a first deploy has none)."""
    problems = misfits(schema, _plain_types({k: v for k, v in cfg.values.items() if k in schema}))
    unset = [p for p in problems if p.endswith("required and not set")]
    return [p for p in problems if p not in unset], unset


async def placed_apps(state: ApiState, node: str) -> set[str]:
    """The apps with an instance placed on `node`: the only ones whose secrets it may read."""
    items, _ = await state.resources.list_instances(node=node)
    return {i.app for i in items}


class Placements:
    """Which apps have an instance on each node, read at a store revision at least as new as asked.

    Every node's config watch sees each change at once and must check the placement after it: one
    read of the instances serves them all (with N nodes, one list per change rather than N, which
    on a busy API held the last node's push behind the others' reads).
    """

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self._last: tuple[dict[str, set[str]], int] = ({}, -1)
        self._reading: asyncio.Task[tuple[dict[str, set[str]], int]] | None = None

    async def at(self, revision: int) -> dict[str, set[str]]:
        """node -> apps placed there, as read at `revision` or later."""
        while self._last[1] < revision:
            if self._reading is None or self._reading.done():
                self._reading = asyncio.create_task(self._read())
                self._reading.add_done_callback(_retrieved)
            # Shielded: one waiter going away (its watch closed) must not cancel the others' read.
            found = await asyncio.shield(self._reading)
            if found[1] > self._last[1]:
                self._last = found
        return self._last[0]

    async def _read(self) -> tuple[dict[str, set[str]], int]:
        items, rev = await self.resources.list_instances()
        by_node: dict[str, set[str]] = {}
        for i in items:
            by_node.setdefault(i.node, set()).add(i.app)
        return by_node, rev


def _retrieved(task: asyncio.Task[Any]) -> None:
    # A failed read is raised to the waiters; with none left, it must not be reported as lost.
    if not task.cancelled():
        task.exception()


_placements: weakref.WeakKeyDictionary[Resources, Placements] = weakref.WeakKeyDictionary()


def placements(state: ApiState) -> Placements:
    found = _placements.get(state.resources)
    if found is None:
        found = _placements[state.resources] = Placements(state.resources)
    return found


def _not_placed(app: str, node: str) -> ApiError:
    return ApiError(
        403,
        "not_placed",
        f"app {app!r} has no instance placed on node {node!r}: a node reads the config in clear only "
        "of the apps it runs",
    )


@router.get(
    "/nodes/{node}/config",
    response_model=NodeConfigList,
    responses={**WATCHABLE, **responses(400)},
    summary="The config in clear, with its token, of each app placed on the node (watch=true streams "
    "changes): for its node agent",
)
async def node_configs(
    node: str,
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("secrets"),
) -> Any:
    check_node(caller, node)
    res = state.resources

    async def items() -> tuple[list[Any], int]:
        found, rev = await res.store.list("/config/")
        placed = await placed_apps(state, node)
        configs = [ConfigState.model_validate_json(kv.value) for kv in found]
        return [c for c in configs if c.app in placed], rev

    async def shape(ev: dict[str, Any]) -> dict[str, Any] | None:
        # A change of an app no longer (or not yet) placed here goes out as a DELETE: the agent forgets
        # what it held of it, and asks again (`/v1/nodes/{node}/apps/{app}/config`) once it runs it.
        obj = ev["object"]
        if obj is None or obj["app"] in (await placements(state).at(ev["revision"])).get(node, ()):
            return ev
        return {"type": "DELETE", "name": obj["app"], "object": None, "revision": ev["revision"]}

    def view(obj: dict[str, Any]) -> dict[str, Any]:
        # The values travel with the event: an agent pushes them on without asking again.
        return {
            "app": obj["app"],
            "version": obj["version"],
            "values": reveal(state, obj["values"]),
            "token": state.secrets.app_token(obj["app"]),
        }

    return await list_or_watch(
        res, "config_values", watch=watch, revision=revision, items=items, view=view, shape=shape
    )


@router.get(
    "/nodes/{node}/apps/{app}/config",
    response_model=NodeConfig,
    responses=responses(404),
    summary="The app's config in clear, and its app token: for the node agent that runs it",
)
async def node_config(
    node: str, app: str, state: ApiState = Depends(get_state), caller: Caller = require("secrets")
) -> dict[str, Any]:
    check_node(caller, node)
    await state.resources.get_app(app)
    if app not in await placed_apps(state, node):
        raise _not_placed(app, node)
    cfg, _ = await state.resources.get_config(app)
    return {
        "app": app,
        "version": cfg.version,
        "values": reveal(state, cfg.values),
        "token": state.secrets.app_token(app),
    }
