"""`osless` commands. Everything but `up` talks to the platform over HTTP only."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.text import Text

from osless.cli.apps import apps_app, restart
from osless.cli.audit import audit
from osless.cli.builder import builder
from osless.cli.cluster import cluster_app
from osless.cli.config import config_app
from osless.cli.credentials import call, client
from osless.cli.dashboard import dashboard, print_up_link
from osless.cli.debug import debug_app
from osless.cli.functions import functions_app
from osless.cli.invocations import invocation, invocations
from osless.cli.invoke import invoke
from osless.cli.node import (
    MAX_GATEWAYS,
    TRACE_SAMPLE,
    GatewayMetricsOpt,
    TraceSampleOpt,
    check_trace_sample,
    node_app,
)
from osless.cli.observe import top, usage
from osless.cli.oneoff import run as run_command
from osless.cli.output import (
    JsonOpt,
    console,
    err_console,
    fail,
    json_option,
    parse_duration,
    print_json,
    table,
    usage_failed,
    when,
)
from osless.cli.queues import dlq_app, queue_app
from osless.cli.schedules import schedule_app
from osless.cli.server import server
from osless.cli.tokens import tokens_app
from osless.cli.traces import traces
from osless.cli.volumes import volumes_app
from osless.errors import ApiError

if TYPE_CHECKING:
    from osless.client import Api

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's own help pages: typer's rich ones import rich.markdown and more, ~50 ms of `--help`'s 150
    rich_markup_mode=None,
    help="osless: run Python apps without an operating system to manage.",
)

DEFAULT_DATA_DIR = Path(os.environ.get("OSLESS_DATA_DIR") or Path.home() / ".local/share/osless")
QUEUED_LOOK_S = 3.0  # a builder `osless up` starts registers within this: no false alarm at start


@app.command()
def up(
    data_dir: Annotated[Path, typer.Option(help="Where state, images and logs live.")] = DEFAULT_DATA_DIR,
    api_port: Annotated[int, typer.Option(help="Port of the REST API.")] = 7070,
    http_port: Annotated[int, typer.Option(help="Port of the gateway (apps' web traffic).")] = 8080,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    gateways: Annotated[
        int | None,
        typer.Option(
            help="Gateway processes sharing the HTTP port (default: one per core).", show_default=False
        ),
    ] = None,
    deploy: Annotated[list[Path] | None, typer.Option(help="Deploy this app once up (repeatable).")] = None,
    trace_sample: TraceSampleOpt = TRACE_SAMPLE,
    gateway_metrics: GatewayMetricsOpt = True,
    sandbox: Annotated[
        bool, typer.Option(help="Run apps in sandboxes (namespaces, seccomp, cgroups).")
    ] = True,
    node_name: Annotated[str | None, typer.Option(help="This node's name (default: the host name).")] = None,
    secret_key_file: Annotated[
        Path | None,
        typer.Option(
            help="The key that encrypts secrets (default: DATA_DIR/secret.key; or set OSLESS_SECRET_KEY)."
        ),
    ] = None,
    egress_allow: Annotated[
        list[str] | None,
        typer.Option(
            metavar="CIDR",
            help="Let apps reach this internal range when they list it in App(egress=...) (repeatable). "
            "Private, loopback, link-local and this host's own addresses are refused otherwise; "
            "this host's own addresses open only to their own entry (ADDR/32).",
        ),
    ] = None,
    nats_port: Annotated[
        int,
        typer.Option(
            help="Port of the message engine (nats-server, on 127.0.0.1 only; default: a free one)."
        ),
    ] = 0,
    json_out: Annotated[
        bool, json_option("Once up, print one JSON object: the API, the gateway and the data dir.")
    ] = False,
) -> None:
    """Run the whole platform on this machine: API, gateway, scheduler and node agent."""
    import asyncio
    import logging
    import threading

    from osless.node.egress_rules import parse_networks
    from osless.server import UpConfig, run

    try:
        allowed = parse_networks(egress_allow or [])
    except ValueError as e:
        fail(str(e))
    if gateways is not None and not 1 <= gateways <= MAX_GATEWAYS:
        fail(f"--gateways must be between 1 and {MAX_GATEWAYS} (one per core is the default), not {gateways}")
    check_trace_sample(trace_sample)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = UpConfig(data_dir=data_dir, api_port=api_port, http_port=http_port, host=host, sandbox=sandbox)
    if node_name:
        cfg.node_name = node_name
    if gateways is not None:
        cfg.gateways = gateways
    cfg.gateway_metrics = gateway_metrics
    cfg.secret_key_file = secret_key_file
    cfg.egress_allow = allowed
    cfg.nats_port = nats_port
    cfg.trace_sample = trace_sample

    def ready(api_url: str, gateway_url: str, token: str) -> None:
        if json_out:
            print_json({"api": api_url, "gateway": gateway_url, "data_dir": str(cfg.data_dir.resolve())})
        else:
            _say_up(cfg, api_url, gateway_url, allowed)
            threading.Thread(target=print_up_link, args=(api_url, token), daemon=True).start()
        if deploy:
            threading.Thread(target=_deploy_all, args=(api_url, token, deploy), daemon=True).start()

    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop  # the gateway, the API and the agent share this loop: the faster one

            uvloop.run(run(cfg, on_ready=ready))
        except ImportError:
            asyncio.run(run(cfg, on_ready=ready))


def _say_up(cfg: Any, api_url: str, gateway_url: str, allowed: list[Any]) -> None:
    console.print(f"[bold green]osless is up[/]  data: {cfg.data_dir.resolve()}")
    console.print(f"  API:     {api_url}   (docs: {api_url}/docs, with a token)")
    console.print(f"  Gateway: {gateway_url}   ({cfg.gateways} process{'es' if cfg.gateways > 1 else ''})")
    if allowed:
        console.print(f"  Egress:  apps may also reach {', '.join(map(str, allowed))} when they list it")
    console.print("  Credentials saved for the CLI; try `osless status` in another terminal.")


def _deploy_all(api_url: str, token: str, paths: list[Path]) -> None:
    from osless.client.sync import Api

    api = Api(api_url, token)
    for path in paths:
        try:
            _deploy(api, path, None, quiet=True, json_out=False, wait=True)
        except (ApiError, typer.Exit, SystemExit) as e:
            console.print(f"[red]demo deploy of {path} failed[/]: {getattr(e, 'message', e)}")


@app.command("deploy")
def deploy_cmd(
    path: Annotated[Path, typer.Argument(help="The app's source folder.")] = Path("."),
    name: Annotated[str | None, typer.Option(help="App name (default: App(name) in the code).")] = None,
    detach: Annotated[bool, typer.Option(help="Return once built, without waiting for instances.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Upload PATH, build it on the platform and roll it out; streams the build output."""
    _deploy(client(), path, name, quiet=json_out, json_out=json_out, wait=not detach)


def _deploy(api: Api, path: Path, name: str | None, *, quiet: bool, json_out: bool, wait: bool) -> None:
    from osless.builder.source import SourceError, pack

    if not path.is_dir():
        fail(f"{path} is not a folder; give the folder that holds your app's code")
    try:
        archive = pack(path)
    except SourceError as e:
        fail(str(e))
    started = time.monotonic()
    deploy = call(
        api.post,
        "/v1/deploys",
        params={"app": name} if name else None,
        content=archive,
        headers={"content-type": "application/gzip"},
    )
    final: dict[str, Any] = deploy
    stop_looking = threading.Event()
    threading.Thread(target=_say_why_queued, args=(api, deploy["id"], stop_looking), daemon=True).start()
    with console.status(
        # Until a builder process claims it (its first line says so).
        f"Queued {path.name or path.resolve().name} ({len(archive) / 1024:.0f} KiB uploaded): "
        "waiting for a builder",
        spinner="dots",
    ) as status:
        try:
            for rec in api.stream(f"/v1/deploys/{deploy['id']}/log", follow="true"):
                if "deploy" in rec:
                    final = rec["deploy"]
                    continue
                line = rec.get("line", "")
                if line.startswith("==> Build failed: "):
                    continue  # the failure's error is printed once, below, as the command's error
                if line.startswith("==> "):
                    status.update(line[4:])
                    if not quiet:
                        console.print(Text(line, style="bold"), soft_wrap=True)
                elif not quiet:
                    console.print(f"    {line}", style="dim", highlight=False, markup=False, soft_wrap=True)
        except ApiError as e:
            fail(e.message, e.code)
        finally:
            stop_looking.set()
        if final.get("status") != "succeeded":
            # Under --json, the deploy record goes with the error: it says which deploy, and its log.
            fail(
                f"deploy failed: {final.get('error') or 'see the build output above'}",
                "deploy_failed",
                deploy=final,
            )
        app_name, version = final["app"], final["release"]
        if wait:
            status.update(f"Starting {app_name} v{version}")
            _wait_ready(api, app_name, version)
    if json_out:
        print_json(final)
        return
    gateway = _gateway(api)
    elapsed = time.monotonic() - started
    console.print(
        f"[green]Deployed {app_name} v{version}[/] in {elapsed:.1f}s  image sha256:{final['image'][:12]}"
        + ("  (dependencies cached)" if final.get("deps_cached") else "")
    )
    release = call(api.get, f"/v1/apps/{app_name}/releases/{version}")
    if release["manifest"].get("web"):
        console.print(f"  web:       {gateway}/{app_name}/")
    for fn in release["manifest"].get("functions") or {}:
        console.print(f"  function:  osless invoke {app_name}.{fn} '{{}}'")


def _say_why_queued(api: Api, deploy_id: str, stop: threading.Event) -> None:
    """While the deploy waits queued, say once (on stderr) if that is because no builder runs: it
    would otherwise wait in silence until one starts."""
    while not stop.wait(QUEUED_LOOK_S):
        try:
            deploy = api.get(f"/v1/deploys/{deploy_id}")
        except Exception:  # a courtesy: the log stream reports what matters
            return
        if deploy.get("status") != "queued":
            return
        reason = str(deploy.get("reason") or "")
        if reason.startswith("no builder"):
            err_console.print(
                "queued: " + reason.replace("--api URL", f"--api {api.base_url}"),
                markup=False,
                soft_wrap=True,
            )
            return


def _wait_ready(api: Api, app_name: str, version: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.02
    while time.monotonic() < deadline:
        info = call(api.get, f"/v1/apps/{app_name}")
        if not info["status"].get("desired"):
            return  # the app is at zero: its first request will start the new release
        mine = [i for i in info["instances"] if i["release"] == version]
        if any(i["status"]["phase"] == "ready" for i in mine):
            return
        failing = [i["status"]["last_exit"]["reason"] for i in mine if i["status"].get("last_exit")]
        if failing and len(failing) == len(mine) and all(i["status"]["restarts"] >= 2 for i in mine):
            fail(
                f"v{version} was released but its instances keep failing ({failing[0]}); "
                f"see `osless logs {app_name}`. The previous release keeps serving."
            )
        time.sleep(pause)
        # Quick at first, when a warm start is about to be ready; then slower, well within the
        # API's requests per token (20 a second) however long the instances take.
        pause = min(pause * 1.25, 0.25)
    fail(
        f"v{version} was released but no instance became ready within {timeout:.0f}s; "
        f"see `osless ps {app_name}`"
    )


def _gateway(api: Api) -> str:
    return str(call(api.get, "/v1/status").get("gateway", ""))


app.add_typer(apps_app, name="apps")
app.command("restart")(restart)
app.command("invoke")(invoke)
app.command("invocations")(invocations)
app.command("invocation")(invocation)
app.command("run")(run_command)
app.add_typer(config_app, name="config")
app.add_typer(tokens_app, name="tokens")
app.add_typer(functions_app, name="functions")
app.add_typer(queue_app, name="queue")
app.add_typer(dlq_app, name="dlq")
app.add_typer(volumes_app, name="volumes")
app.add_typer(debug_app, name="debug")
app.add_typer(node_app, name="node")
app.command("server")(server)
app.add_typer(cluster_app, name="cluster")
app.command("builder")(builder)
app.command("audit")(audit)
app.add_typer(schedule_app, name="schedule")
app.command("traces")(traces)
app.command("top")(top)
app.command("usage")(usage)
app.command("dashboard")(dashboard)


@app.command()
def releases(app_name: Annotated[str, typer.Argument(metavar="APP")], json_out: JsonOpt = False) -> None:
    """An app's release history, newest first."""
    api = client()
    current = call(api.get, f"/v1/apps/{app_name}")["current_release"]
    items = sorted(call(api.get, f"/v1/apps/{app_name}/releases")["items"], key=lambda r: -r["version"])
    if json_out:
        print_json(items)
        return
    table(
        ["", "VERSION", "IMAGE", "DESCRIPTION", "CREATED"],
        [
            [
                "*" if r["version"] == current else "",
                f"v{r['version']}",
                r["image"][:12],
                r["description"],
                when(r["created_at"]),
            ]
            for r in items
        ],
    )


@app.command()
def ps(
    app_name: Annotated[str | None, typer.Argument(metavar="[APP]")] = None, json_out: JsonOpt = False
) -> None:
    """Instances and their state; the last exit says why an instance stopped."""
    api = client()
    items = call(api.get, "/v1/instances", **({"app": app_name} if app_name else {}))["items"]
    if app_name and not items:
        call(api.get, f"/v1/apps/{app_name}")  # an unknown app is an error, not an empty table
    if json_out:
        print_json(items)
        return
    rows = []
    for i in sorted(items, key=lambda i: (i["app"], i["created_at"])):
        st = i["status"]
        last = st.get("last_exit") or {}
        rows.append(
            [
                i["id"],
                f"v{i['release']}",
                st["phase"],
                st.get("pid") or "-",
                st.get("restarts", 0),
                last.get("reason", "-"),
                i["node"],
                when(i["created_at"]),
            ]
        )
    if app_name:
        shown = [call(api.get, f"/v1/apps/{app_name}")["status"]]
    else:
        shown = call(api.get, "/v1/appstatus")["items"]
    for st in shown:
        ready = sum(1 for i in items if i["app"] == st["app"] and i["status"]["phase"] == "ready")
        desired = "-" if st.get("desired") is None else st["desired"]
        console.print(
            f"{st['app']}: desired {desired}, ready {ready}  ({st.get('scale_reason') or 'no decision yet'})",
            markup=False,
            highlight=False,
        )
    table(["INSTANCE", "RELEASE", "STATE", "PID", "RESTARTS", "LAST EXIT", "NODE", "CREATED"], rows)


@app.command()
def logs(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    tail: Annotated[
        int | None,
        typer.Option(help="How many recent lines to show first (default 100; 10000 with --since)."),
    ] = None,
    instance: Annotated[str | None, typer.Option(help="Only this instance.")] = None,
    since: Annotated[str | None, typer.Option(help="Only lines of the last 90s, 10m, 2h, 1d...")] = None,
    grep: Annotated[str | None, typer.Option(help="Only lines holding this text (not a regex).")] = None,
    request: Annotated[str | None, typer.Option(help="Only the lines of this request id.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """An app's logs (stdout, stderr, `logging` records, access lines and platform events of every
    instance); filtered where they are kept."""
    from osless.cli.logview import show

    seconds = parse_duration(since, "--since") if since is not None else None
    params = {
        "tail": tail if tail is not None else (10_000 if since is not None else 100),
        "follow": str(follow).lower(),
        "instance": instance,
        "since": seconds,
        "grep": grep,
        "request": request,
    }
    try:
        for rec in client().stream(f"/v1/apps/{app_name}/logs", **params):
            if json_out:
                print(json.dumps(rec), flush=True)
            else:
                show(rec)
    except ApiError as e:
        fail(e.message, e.code)
    except KeyboardInterrupt:
        pass


@app.command()
def rollback(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    to: Annotated[
        int | None, typer.Option(help="Release version to return to (default: the previous).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Release an earlier image again, as a new release."""
    release = call(client().post, f"/v1/apps/{app_name}/rollback", {"to": to})
    if json_out:
        print_json(release)
        return
    console.print(f"[green]{app_name} v{release['version']}[/]: {release['description']}")


@app.command()
def scale(
    app_name: Annotated[str, typer.Argument(metavar="APP")],
    min_: Annotated[
        int | None, typer.Option("--min", help="Instances always running (0: scale to zero).")
    ] = None,
    max_: Annotated[int | None, typer.Option("--max", help="Upper bound on instances.")] = None,
    target: Annotated[float | None, typer.Option(help="Concurrent requests per instance to aim for.")] = None,
    idle: Annotated[
        float | None, typer.Option(help="Seconds without a request before scaling to zero.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Requests in flight at once; past it, 429.")] = None,
    max_body_mb: Annotated[float | None, typer.Option(help="Request body limit in MB; past it, 413.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Set an app's instance bounds and autoscaling policy (only what you give changes)."""
    body = {
        "min": min_,
        "max": max_,
        "target": target,
        "idle_s": idle,
        "concurrency_limit": limit,
        "max_body_mb": max_body_mb,
    }
    result = call(
        client().put, f"/v1/apps/{app_name}/scale", {k: v for k, v in body.items() if v is not None}
    )
    if json_out:
        print_json(result)
        return
    policy = result["autoscale"]
    console.print(
        f"{app_name}: min {result['min']}, max {result['max']}, target {policy['target']:g} in flight "
        f"per instance, to zero after {policy['idle_s']:g}s idle, limit {policy['concurrency_limit']}"
    )


@app.command()
def doctor(json_out: JsonOpt = False) -> None:
    """Which protections this host gives app sandboxes, found by trying each one."""
    from osless.node import doctor as probe

    checks = probe.check()
    if json_out:
        print_json([{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks])
    else:
        table(["PROTECTION", "", "DETAIL"], [[c.name, "ok" if c.ok else "MISSING", c.detail] for c in checks])
    missing = [c.name for c in checks if not c.ok]
    if missing and json_out:
        raise typer.Exit(1)  # the list says what is missing: one document on stdout, not two
    if missing:
        required = [n for n in missing if n in probe.REQUIRED]
        fail(
            ("apps would run WITHOUT a sandbox: " if required else "apps would run with weaker isolation: ")
            + ", ".join(missing)
            + " missing"
        )


@app.command()
def status(json_out: JsonOpt = False) -> None:
    """The platform at a glance."""
    st = call(client().get, "/v1/status")
    if json_out:
        print_json(st)
        return
    inst = ", ".join(f"{n} {k}" for k, n in sorted(st["instances"].items())) or "none"
    console.print(f"osless {st['version']}  up {st['uptime_s']:.0f}s  revision {st['revision']}")
    console.print(f"  gateway:   {st['gateway']}")
    console.print(f"  apps:      {st['apps']}")
    console.print(f"  instances: {inst}")
    console.print(f"  nodes:     {', '.join(st['nodes']) or 'none'}")


@app.command()
def nodes(json_out: JsonOpt = False) -> None:
    """The nodes: address, gateway, ready or not, instances, free memory, the node process's pid."""
    api = client()
    found = call(api.get, "/v1/nodes")["items"]
    instances = call(api.get, "/v1/instances")["items"]
    now = time.time()
    rows = []
    for n in found:
        here = [i for i in instances if i["node"] == n["name"]]
        rows.append(
            {
                **n,
                # Listed means its lease holds; ready means it reported within its lease's time.
                "ready": now - float(n["updated_at"]) < float(n["ttl_s"]),
                "instances": len(here),
                "instances_ready": sum(i["status"]["phase"] == "ready" for i in here),
            }
        )
    if json_out:
        print_json(rows)
        return
    table(
        ["NODE", "ADDRESS", "GATEWAY", "READY", "INSTANCES", "FREE MEMORY", "PID"],
        [
            [
                r["name"],
                r.get("address") or "-",
                r.get("gateway") or "-",
                "yes" if r["ready"] else "no",
                f"{r['instances_ready']}/{r['instances']}",
                f"{r['memory_free_mb']} of {r['memory_total_mb']} MB"
                if r.get("memory_free_mb") is not None
                else "-",
                str(r.get("pid") or "-"),
            ]
            for r in rows
        ],
    )


def _only(args: list[str]) -> typer.Typer:
    """`app` with just the command (or group) the command line names, when it names one: typer builds
    the options of every command it holds at each start (~20 ms for all of them), a run needs its own."""
    name = args[0] if args else ""
    one = typer.Typer(
        add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, help=app.info.help
    )
    one.registered_commands = [
        c
        for c in app.registered_commands
        if (c.name or (c.callback.__name__.lower().replace("_", "-") if c.callback else None)) == name
    ]
    one.registered_groups = [g for g in app.registered_groups if g.name == name]
    if not one.registered_commands and not one.registered_groups:
        return app  # --help, or a name click will refuse in its own words
    one.callback()(_root)  # a group even of one: `osless NAME ...` keeps NAME
    return one


def _root() -> None:
    """osless: run Python apps without an operating system to manage."""


def main() -> NoReturn:
    import sys

    import click

    try:
        # Not standalone: a command line click refuses is said here, in JSON under --json.
        code = typer.main.get_command(_only(sys.argv[1:])).main(standalone_mode=False)
    except click.ClickException as e:
        usage_failed(e)
    except click.Abort:
        err_console.print("Aborted.")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)
