"""An app's configuration: typed by the schema in its code, set here, pushed live by the node agents.

Every change is a new version with who and when; secrets are encrypted at rest and shown masked.
Only a node token reads them in clear (`/v1/nodes/{node}/apps/{app}/config`), to hand them to the
app's own instances.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from osless.api.auth import Caller, require
from osless.api.errors import ApiError
from osless.api.models import ConfigChange, ConfigPatch, ConfigRollback, ConfigState, now
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
    schema: dict[str, dict[str, Any]] = release.manifest.get("config") or {}
    return schema


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


@router.get("/apps/{app}/config", summary="The app's config (secrets masked) and its schema")
async def get_config(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("describe")
) -> dict[str, Any]:
    schema = await app_schema(state, app)
    cfg, _ = await state.resources.get_config(app)
    return _view(cfg, schema)


@router.get("/apps/{app}/config/schema", summary="What the app's code declares it can be told")
async def get_schema(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("describe")
) -> dict[str, Any]:
    return {"app": app, "schema": await app_schema(state, app)}


@router.patch("/apps/{app}/config", summary="Set and unset keys; `revision` makes it compare-and-swap")
async def patch_config(
    app: str,
    body: ConfigPatch,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> dict[str, Any]:
    schema = await app_schema(state, app)
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
    problems, coerced = [], {}
    for key, value in body.set.items():
        try:
            coerced[key] = coerce(key, schema[key], value)
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise ApiError(422, "invalid_value", "; ".join(problems))
    cfg, rev = await state.resources.get_config(app)
    if body.revision is not None and body.revision != cfg.version:
        raise ApiError(
            409,
            "stale_revision",
            f"the config of {app!r} is at version {cfg.version}, not "
            f"{body.revision}: read it again, then retry",
        )
    changes: dict[str, Any] = {}
    values = dict(cfg.values)
    for key, value in coerced.items():
        secret = schema[key]["type"] == "secret"
        values[key] = {"$secret": state.secrets.encrypt(value)} if secret else value
        changes[key] = {"set": MASK if secret else value}
    for key in body.unset:
        if values.pop(key, None) is not None:
            changes[key] = {"unset": True}
    return await _commit(state, app, cfg, rev, values, changes, caller, "set " + ", ".join(sorted(changes)))


async def _commit(
    state: ApiState,
    app: str,
    cfg: ConfigState,
    rev: int,
    values: dict[str, Any],
    changes: dict[str, Any],
    caller: Caller,
    description: str,
) -> dict[str, Any]:
    if not changes:
        return _view(cfg, None)
    new = ConfigState(
        app=app, version=cfg.version + 1, values=values, updated_at=now(), updated_by=caller.name
    )
    change = ConfigChange(
        app=app,
        version=new.version,
        by=new.updated_by,
        description=description,
        changes=changes,
        values=values,
    )
    try:
        await state.resources.commit_config(new, rev, change)
    except Conflict as e:
        raise ApiError(
            409, "stale_revision", f"the config of {app!r} changed meanwhile; read it again"
        ) from e
    return _view(new, None)


@router.get("/apps/{app}/config/history", summary="Every version of the app's config: who, when, what")
async def config_history(
    app: str, state: ApiState = Depends(get_state), caller: Caller = require("read")
) -> dict[str, Any]:
    await state.resources.get_app(app)
    items = await state.resources.config_history(app)
    return {"items": [c.model_dump(exclude={"values"}) for c in sorted(items, key=lambda c: -c.version)]}


@router.post("/apps/{app}/config/rollback", summary="Make an earlier version's values current again")
async def config_rollback(
    app: str,
    body: ConfigRollback,
    state: ApiState = Depends(get_state),
    caller: Caller = require("deploy"),
) -> dict[str, Any]:
    schema = await app_schema(state, app)
    cfg, rev = await state.resources.get_config(app)
    if body.to == 0:
        target: dict[str, Any] = {}
    else:
        found = [c for c in await state.resources.config_history(app) if c.version == body.to]
        if not found:
            raise ApiError(
                404,
                "version_not_found",
                f"the config of {app!r} has no version {body.to}; `osless config history {app}` lists them",
            )
        target = found[0].values
    # A required key left unset is allowed here as anywhere: reading it raises in the app, clearly.
    problems = [p for p in misfits(schema, _plain_types(target)) if not p.endswith("required and not set")]
    if problems:
        raise ApiError(
            422, "invalid_value", f"version {body.to} does not fit the current schema: " + "; ".join(problems)
        )
    changes: dict[str, Any] = {}
    for key in sorted(set(target) | set(cfg.values)):
        if target.get(key) != cfg.values.get(key):
            if key not in target:
                changes[key] = {"unset": True}
            else:
                changes[key] = {"set": MASK if is_secret(target[key]) else target[key]}
    if not changes:
        return _view(cfg, None)
    return await _commit(
        state, app, cfg, rev, dict(target), changes, caller, f"rollback to version {body.to}"
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


@router.get(
    "/nodes/{node}/config",
    summary="Every app's config in clear, with its token (watch=true streams changes): for node agents",
)
async def node_configs(
    node: str,
    watch: bool = False,
    revision: int | None = Query(default=None, ge=0),
    state: ApiState = Depends(get_state),
    caller: Caller = require("secrets"),
) -> Any:
    res = state.resources

    async def items() -> tuple[list[Any], int]:
        found, rev = await res.store.list("/config/")
        return [ConfigState.model_validate_json(kv.value) for kv in found], rev

    def view(obj: dict[str, Any]) -> dict[str, Any]:
        # The values travel with the event: an agent pushes them on without asking again.
        return {
            "app": obj["app"],
            "version": obj["version"],
            "values": reveal(state, obj["values"]),
            "token": state.secrets.app_token(obj["app"]),
        }

    return await list_or_watch(res, "config_values", watch=watch, revision=revision, items=items, view=view)


@router.get(
    "/nodes/{node}/apps/{app}/config",
    summary="The app's config in clear, and its app token: for the node agent that runs it",
)
async def node_config(
    node: str, app: str, state: ApiState = Depends(get_state), caller: Caller = require("secrets")
) -> dict[str, Any]:
    await state.resources.get_app(app)
    cfg, _ = await state.resources.get_config(app)
    return {
        "app": app,
        "version": cfg.version,
        "values": reveal(state, cfg.values),
        "token": state.secrets.app_token(app),
    }
