"""`osless config ...`: what an app can be told (its schema), what it has been told, and when."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, when

__all__ = ["config_app"]

config_app = typer.Typer(
    no_args_is_help=True, rich_markup_mode=None, help="An app's live configuration and secrets."
)
AppArg = Annotated[str, typer.Argument(metavar="APP")]


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _print(cfg: dict[str, Any], schema: dict[str, Any]) -> None:
    rows = []
    for key, spec in sorted(schema.items()):
        if key in cfg["values"]:
            value = _show(cfg["values"][key])
        elif "default" in spec:
            value = f"{_show(spec['default'])} (default)"
        else:
            value = "(not set)"
        rows.append([key, value, spec["type"] + (", restart" if spec.get("restart") else "")])
    table(["KEY", "VALUE", "TYPE"], rows)
    console.print(
        f"version {cfg['version']}"
        + (f", by {cfg['updated_by']} {when(cfg['updated_at'])}" if cfg.get("updated_by") else ""),
        style="dim",
    )


@config_app.command("get")
def get(app: AppArg, key: Annotated[str | None, typer.Argument()] = None, json_out: JsonOpt = False) -> None:
    """Show the app's config (secrets masked), or one key's value."""
    cfg = call(client().get, f"/v1/apps/{app}/config")
    schema = cfg.get("schema") or {}
    if key is not None:
        if key not in schema:
            fail(f"{app} has no config key {key!r} (it has: {', '.join(sorted(schema)) or 'none'})")
        value = cfg["values"].get(key, schema[key].get("default"))
        print(json.dumps(value) if json_out else _show(value))
        return
    if json_out:
        print_json(cfg)
        return
    _print(cfg, schema)


def _parse(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            fail(f"give settings as KEY=VALUE, not {pair!r}")
        values[key] = sys.stdin.read().rstrip("\n") if value == "-" else value  # `-`: a secret from stdin
    return values


@config_app.command("set")
def set_(
    app: AppArg,
    pairs: Annotated[list[str], typer.Argument(metavar="KEY=VALUE...", help="VALUE - reads it from stdin.")],
    revision: Annotated[int | None, typer.Option(help="Only if the config is still at this version.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Set keys; every running instance sees the new values at once."""
    body: dict[str, Any] = {"set": _parse(pairs)}
    if revision is not None:
        body["revision"] = revision
    cfg = call(client().request, "PATCH", f"/v1/apps/{app}/config", json=body)
    if json_out:
        print_json(cfg)
        return
    console.print(f"{app}: config version {cfg['version']}")


@config_app.command("unset")
def unset(
    app: AppArg, keys: Annotated[list[str], typer.Argument(metavar="KEY...")], json_out: JsonOpt = False
) -> None:
    """Unset keys: they fall back to their defaults."""
    cfg = call(client().request, "PATCH", f"/v1/apps/{app}/config", json={"unset": keys})
    if json_out:
        print_json(cfg)
        return
    console.print(f"{app}: config version {cfg['version']}")


@config_app.command("history")
def history(app: AppArg, json_out: JsonOpt = False) -> None:
    """Every version of the app's config: who changed what, when (secrets masked)."""
    items = call(client().get, f"/v1/apps/{app}/config/history")["items"]
    if json_out:
        print_json(items)
        return
    rows = []
    for c in items:
        changes = ", ".join(
            f"{k} unset" if v.get("unset") else f"{k}={_show(v['set'])}"
            for k, v in sorted(c["changes"].items())
        )
        rows.append([c["version"], c["by"] or "-", when(c["at"]), c["description"], changes])
    table(["VERSION", "BY", "WHEN", "WHAT", "CHANGES"], rows)


@config_app.command("rollback")
def rollback(
    app: AppArg,
    to: Annotated[int, typer.Option(help="The config version to return to (0: no values).")],
    drop_secrets: Annotated[
        bool, typer.Option("--drop-secrets", help="Remove the secrets set now that version TO lacks.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make an earlier version's values current again (as a new version).

    Refused if it would unset a key the current release requires, or drop a secret without
    --drop-secrets."""
    body: dict[str, Any] = {"to": to, "drop_secrets": True} if drop_secrets else {"to": to}
    cfg = call(client().post, f"/v1/apps/{app}/config/rollback", body)
    if json_out:
        print_json(cfg)
        return
    console.print(f"{app}: config version {cfg['version']} (the values of version {to})")


@config_app.command("schema")
def schema(app: AppArg, json_out: JsonOpt = False) -> None:
    """What the app's code declares it can be told."""
    found = call(client().get, f"/v1/apps/{app}/config/schema")["schema"]
    if json_out:
        print_json(found)
        return
    table(
        ["KEY", "TYPE", "DEFAULT", "RESTART"],
        [
            [
                k,
                s["type"],
                _show(s["default"]) if "default" in s else "(required)",
                "yes" if s.get("restart") else "",
            ]
            for k, s in sorted(found.items())
        ],
    )
