"""The dashboard's pages (`/ui`): server-rendered from the REST API's own answers, with the user's token.

Each page handler reads what it shows through the API itself (`ApiReader`: the guarded ASGI app,
called in process with the session's token), so a page shows exactly what that token may read,
and nothing else; every change is made by the page's script calling `/v1/...` (`ui.gate`). The
charts follow `/ui/apps/{app}/series` (Server-Sent Events, fed by `ui.series`), the log tail and a
build log the API's own NDJSON streams.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import httpx
import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from osless.api.errors import error_body
from osless.api.state import ApiState
from osless.api.ui.series import FIELDS, SAMPLE_S, Series
from osless.api.ui.session import (
    COOKIE,
    PEOPLE,
    Session,
    cookie_header,
    from_our_pages,
    open_session,
    owns,
    peek_code,
    redeem_code,
    same_origin,
    seal,
    session_cookie,
    session_cookie_values,
    session_cookies,
    sign_out,
    signed_out,
)
from osless.api.usage import LIVE_PREFIX, read_usage

__all__ = ["CSP", "build_ui"]

HERE = Path(__file__).parent
SIGNIN = "/ui/signin"
DOUBLED = (
    "this browser sends two dashboard session cookies for this page: one was set by a page of another "
    "port of this host, and signing in replaces only this site's own. Clear this site's cookies "
    "in the browser, then sign in"
)
MAX_FORM = 8192  # the sign-in form: a token and a CSRF value, nothing more
MAX_SESSION_COOKIES = 4  # read at a sign-out: the visitor's own and what scripts added beside it
RECHECK_S = 60.0  # a chart's stream asks again whether its token may still read the app
# Event streams open at once per token, in this process: each holds a connection and a task, and
# past the first request (one of the token's budget) costs nothing more: else a loop opening them
# would keep any number. A person has a few tabs.
MAX_STREAMS = 8
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on our own POSTs.
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
    # A window of another origin that opened a page (or was opened by one) loses its hold on it: it can
    # no longer navigate it later, nor count its frames or see when it moves (https and localhost).
    "cross-origin-opener-policy": "same-origin",
}


class ApiReader:
    """GETs of the API, in process, as the session's token: the guard, limits and permissions apply."""

    def __init__(self, api: ASGIApp, token: str, request: Request) -> None:
        # The visitor's address, so the guard throttles failed sign-ins per visitor, not all at once.
        client = request.client
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=api, client=(client.host, client.port) if client else ("", 0)),
            base_url="http://osless.ui",
            headers={"authorization": f"Bearer {token}"},
        )

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        r = await self.client.get(path, params={k: v for k, v in params.items() if v is not None})
        if r.status_code == 429:
            raise Throttled
        try:
            body = r.json()
        except ValueError:
            body = None
        return r.status_code, body

    async def ok(self, path: str, default: Any = None, **params: Any) -> Any:
        """The answer's body, or `default` when the token may not read it or it does not exist."""
        status, body = await self.get(path, **params)
        return body if status == 200 else default

    async def aclose(self) -> None:
        await self.client.aclose()


class Unauthorized(Exception):
    """The session's token is refused (revoked, expired): sign in again."""


class Throttled(Exception):
    """The token's request budget is spent for now (the guard's 429)."""


def _templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # everything an app or a user controls (names, log lines, values) escaped
    )
    env.filters["when"] = lambda t: "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    env.filters["ago"] = _ago
    env.filters["json"] = lambda v: json.dumps(v, sort_keys=True)
    return Jinja2Templates(env=env)


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _redirect(to: str) -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers=SECURITY_HEADERS)


def build_ui(state: ApiState, api: ASGIApp) -> Starlette:
    templates = _templates()
    series = Series(state.resources)
    streams: dict[str, int] = {}  # open event streams by token digest (`MAX_STREAMS`)

    def too_many_streams(session: Session) -> Response | None:
        if streams.get(_digest(session.token), 0) < MAX_STREAMS:
            return None
        message = f"{MAX_STREAMS} live views are open with this token already: close a tab"
        return JSONResponse(error_body("too_many_streams", message), 429)

    async def counted(session: Session, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`events`, counted among the token's open streams; counted when it starts (a stream that
        never starts never ends either), and ended at once if others filled the count meanwhile."""
        key = _digest(session.token)
        if streams.get(key, 0) >= MAX_STREAMS:
            return
        streams[key] = streams.get(key, 0) + 1
        try:
            async for chunk in events:
                yield chunk
        finally:
            streams[key] -= 1
            if not streams[key]:
                del streams[key]

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        return templates.TemplateResponse(
            request, name, {"fields": FIELDS, **context}, status_code=status, headers=SECURITY_HEADERS
        )

    async def session_of(request: Request) -> Session | None:
        if not from_our_pages(request.headers):
            return None
        session = open_session(state.secrets, session_cookie(request.headers.get("cookie")))
        if session is None or await signed_out(state.resources.store, session):
            return None
        return session

    async def whoami(reader: ApiReader) -> dict[str, Any]:
        status, who = await reader.get("/v1/whoami")
        if status == 401:
            raise Unauthorized
        can = set(who.get("permissions", ())) if status == 200 else set()
        return {**(who or {}), "can": {p: p in can for p in ("deploy", "invoke", "logs", "admin", "read")}}

    def signed_in(handler: Any) -> Any:
        """A page for a session only: a visitor without one is sent to sign in, with no data."""

        async def wrapped(request: Request) -> Response:
            session = await session_of(request)
            if session is None:
                return _redirect(SIGNIN)
            series.start()
            reader = ApiReader(api, session.token, request)
            try:
                who = await whoami(reader)
                response: Response = await handler(request, session, reader, who)
                return response
            except Unauthorized:
                response = _redirect(SIGNIN)
                response.delete_cookie(COOKIE, path="/")
                return response
            except Throttled:
                message = "too many requests with this token just now: reload in a few seconds"
                return page(request, "error.html", {"who": None, "message": message}, 429)
            finally:
                await reader.aclose()

        return wrapped

    # -- sign-in -----------------------------------------------------------------------------------

    async def signin_form(request: Request) -> Response:
        # Two session cookies open nothing (`session_cookie`), and a sign-in replaces only the one
        # this origin set: the other, a page's script's with a narrower Path, stays until cleared.
        two = session_cookies(request.headers.get("cookie")) > 1
        return page(request, "signin.html", {"error": DOUBLED if two else None, "who": None})

    async def form_of(request: Request) -> dict[str, str] | Response:
        """A sign-in form's fields, bounded, from a page of this host only (a form posted from
        another site would sign the visitor in as someone else: login CSRF)."""
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM:
                return page(request, "signin.html", {"error": "that form is too large", "who": None}, 413)
        if not same_origin(request.headers):
            return page(request, "signin.html", {"error": "sign in from this page", "who": None}, 403)
        fields = parse_qs(body.decode("utf-8", "replace"))
        return {k: v[0].strip() for k, v in fields.items() if v}

    async def signin(request: Request) -> Response:
        form = await form_of(request)
        if isinstance(form, Response):
            return form
        refused = "that token was refused: check it, or make one with `osless tokens create`"
        return await _open(request, form.get("token", ""), refused)

    async def link_form(request: Request) -> Response:
        # Opening the link redeems nothing: a link preview or prefetcher would spend the code, and a
        # link from another site would sign the visitor in as its maker. The button posts it; the
        # page says whose token that is first (an app's page may offer its author's link).
        code = request.query_params.get("code", "")[:64]
        owner = await peek_code(state.resources.store, code)
        # Whether it is another token than this browser's session's: told by the server, as no name can
        # tell (the page warns then; it never reassures, the session may be one an app's page planted).
        session = await session_of(request) if owner is not None else None
        mine = None if session is None or owner is None else owns(session, owner.get("digest"))
        return page(
            request,
            "link.html",
            {"code": code, "owner": owner, "mine": mine, "who": None},
            200 if owner is not None else 400,
        )

    async def link(request: Request) -> Response:
        form = await form_of(request)
        if isinstance(form, Response):
            return form
        token = await redeem_code(state.resources.store, state.secrets, form.get("code", ""))
        if token is None:
            return page(
                request,
                "signin.html",
                {
                    "error": "that sign-in link was used already or has expired: "
                    "ask `osless dashboard` for another",
                    "who": None,
                },
                400,
            )
        return await _open(request, token, "the token of that link is no longer valid")

    async def _open(request: Request, token: str, refused: str) -> Response:
        if not (token.isascii() and token.isprintable()):  # no token of ours; nor a header's value
            return page(request, "signin.html", {"error": refused, "who": None}, 401)
        reader = ApiReader(api, token, request)
        try:
            status, who = await reader.get("/v1/whoami") if token else (401, None)
        except Throttled:
            return page(request, "signin.html", {"error": "too many tries: wait a little", "who": None}, 429)
        finally:
            await reader.aclose()
        if status != 200 or not isinstance(who, dict) or who.get("role") not in PEOPLE:
            return page(request, "signin.html", {"error": refused, "who": None}, 401)
        # A fresh session (and CSRF value) at every sign-in: whatever cookie came before is replaced.
        # Its CSRF value is handed over here only, for the page's script to keep in this origin's
        # storage, then go to /ui: a session cookie planted by a page of another port never had that.
        value, session = seal(state.secrets, token)
        response = page(request, "signedin.html", {"sid": session.sid, "csrf": session.csrf, "who": None})
        response.headers.append("set-cookie", cookie_header(value, secure=_secure(request)))
        return response

    async def signout(request: Request) -> Response:
        form = await form_of(request)
        if isinstance(form, Response):
            return form
        # Without the session's CSRF value (a session this browser did not sign in to: planted), only
        # this browser's cookie goes: the way out for its visitor. With it, every session of the token,
        # that cookie's even beside one a page's script added (which opens nothing, `session_cookie`):
        # else the visitor's own would live on, signed out as they believe.
        if from_our_pages(request.headers):
            for value in session_cookie_values(request.headers.get("cookie"))[:MAX_SESSION_COOKIES]:
                session = open_session(state.secrets, value)
                if session is not None and session.csrf_ok(form.get("csrf")):
                    await sign_out(state.resources.store, session)  # the cookie is the browser's to keep
        response = _redirect(SIGNIN)
        response.headers.append("set-cookie", cookie_header("", secure=_secure(request), max_age=0))
        return response

    # -- pages -------------------------------------------------------------------------------------

    @signed_in
    async def overview(
        request: Request, session: Session, reader: ApiReader, who: dict[str, Any]
    ) -> Response:
        apps = (await reader.ok("/v1/apps", {"items": []}))["items"]
        top = await reader.ok("/v1/top", {"apps": {}, "instances": []})
        nodes = (await reader.ok("/v1/nodes", {"items": []}))["items"]
        instances = (await reader.ok("/v1/instances", {"items": []}))["items"]
        deploys = (await reader.ok("/v1/deploys", {"items": []}))["items"]
        statuses = {s["app"]: s for s in (await reader.ok("/v1/appstatus", {"items": []}))["items"]}
        now = time.time()
        midnight = now // 86400 * 86400
        rows = []
        live, _ = await state.resources.store.list(LIVE_PREFIX)  # the nodes' views, once for every app
        for a in apps:
            name = a["name"]
            # The usage route's own reading, for the apps this token listed (it may read them): one
            # call per app would spend the token's request budget on a page view.
            hours = await read_usage(
                state.resources.store, name, max(midnight, a["created_at"] // 3600 * 3600), now, live
            )
            mine = [i for i in instances if i["app"] == name]
            building = any(d["app"] == name and d["status"] in ("queued", "building") for d in deploys)
            rows.append(
                {
                    "name": name,
                    "state": _state(mine, building, a),
                    "live": top["apps"].get(name, {}),
                    "instances": sum(1 for i in mine if i["status"]["phase"] == "ready"),
                    "desired": statuses.get(name, {}).get("desired"),
                    "gb_s": sum(h["gb_s"] for h in hours),
                    "release": a.get("current_release"),
                }
            )
        load: dict[str, dict[str, float]] = {}
        for inst in top["instances"]:
            into = load.setdefault(inst["node"], {"cpu": 0.0, "instances": 0})
            into["cpu"] += inst.get("cpu", 0.0)
            into["instances"] += 1
        for n in nodes:
            n["live"] = n["updated_at"] + n["ttl_s"] > now
            n["load"] = load.get(n["name"], {"cpu": 0.0, "instances": 0})
        if who["can"]["admin"]:
            # What changed the platform: a sign-in link made is no change of it.
            writes = (await reader.ok("/v1/audit", {"items": []}, limit=100))["items"]
            changes = [e for e in writes if not e["path"].startswith("/v1/dashboard/")][:15]
        else:
            changes = None
        recent = sorted(deploys, key=lambda d: d["created_at"], reverse=True)[:10]
        context = {"who": who, "sid": session.sid, "apps": rows, "nodes": nodes, "changes": changes}
        return page(request, "overview.html", {**context, "deploys": recent})

    async def app_context(reader: ApiReader, app: str, part: str = "all") -> dict[str, Any] | None:
        """What the app's page (or one `part` of it) shows: only the calls that part needs, each a
        request of the token's budget."""
        status, detail = await reader.get(f"/v1/apps/{quote(app)}")
        if status != 200:
            return None
        context: dict[str, Any] = {"app": detail}
        if part == "instances":
            return context
        q = quote(app)
        releases = (await reader.ok(f"/v1/apps/{q}/releases", {"items": []}))["items"]
        deploys = [d for d in (await reader.ok("/v1/deploys", {"items": []}))["items"] if d["app"] == app]
        config = await reader.ok(f"/v1/apps/{q}/config", {"values": {}, "schema": {}, "version": 0})
        history = (await reader.ok(f"/v1/apps/{q}/config/history", {"items": []}))["items"]
        manifest = (detail.get("release") or {}).get("manifest") or {}
        building = any(d["status"] in ("queued", "building") for d in deploys)
        context |= {
            "state": _state(detail["instances"], building, detail),
            "releases": sorted(releases, key=lambda r: r["version"], reverse=True),
            "deploys": sorted(deploys, key=lambda d: d["created_at"], reverse=True)[:10],
            "config": config,
            "schema": config.get("schema") or {},
            "history": history[:20],
            "functions": manifest.get("functions", {}),
            "schedules": [],
            "queues": [],
            "dlq": [],
        }
        if part != "all":
            return context
        # Queues, dead letters and schedules where the release has them (the message engine is asked).
        if manifest.get("schedules"):
            context["schedules"] = (await reader.ok(f"/v1/apps/{q}/schedules", {"items": []}))["items"]
        if manifest.get("consumers") or manifest.get("functions"):
            context["dlq"] = (await reader.ok(f"/v1/apps/{q}/dlq", {"items": []}))["items"]
        if manifest.get("consumers"):
            context["queues"] = (await reader.ok("/v1/queues", {"items": []}, app=app))["items"]
        return context

    @signed_in
    async def app_page(
        request: Request, session: Session, reader: ApiReader, who: dict[str, Any]
    ) -> Response:
        app = request.path_params["app"]
        context = await app_context(reader, app)
        if context is None:
            return page(
                request,
                "error.html",
                {"who": who, "sid": session.sid, "message": f"no app {app!r} that this token may read"},
                404,
            )
        return page(request, "app.html", {"who": who, "sid": session.sid, **context})

    @signed_in
    async def app_part(
        request: Request, session: Session, reader: ApiReader, who: dict[str, Any]
    ) -> Response:
        part = request.path_params["part"]
        if part not in ("settings", "instances"):
            return Response(status_code=404, headers=SECURITY_HEADERS)
        context = await app_context(reader, request.path_params["app"], part)
        if context is None:
            return Response(status_code=404, headers=SECURITY_HEADERS)
        return page(request, f"_{part}.html", {"who": who, "sid": session.sid, **context})

    @signed_in
    async def deploy_page(
        request: Request, session: Session, reader: ApiReader, who: dict[str, Any]
    ) -> Response:
        deploy_id = request.path_params["deploy"]
        status, deploy = await reader.get(f"/v1/deploys/{quote(deploy_id)}")
        if status != 200:
            return page(
                request, "error.html", {"who": who, "sid": session.sid, "message": "no such deploy"}, 404
            )
        return page(request, "deploy.html", {"who": who, "sid": session.sid, "deploy": deploy})

    async def status_of(token: str, request: Request, path: str) -> int:
        """The status the API answers `token` for GET `path` (429 when its budget is spent)."""
        reader = ApiReader(api, token, request)
        try:
            return (await reader.get(path))[0]
        except Throttled:
            return 429
        finally:
            await reader.aclose()

    async def app_series(request: Request) -> Response:
        """Server-Sent Events: the last hour of the app's figures, then each new sample."""
        session = await session_of(request)
        if session is None:
            return JSONResponse(error_body("unauthorized", "sign in at /ui/signin"), 401)
        app = request.path_params["app"]
        path = f"/v1/apps/{quote(app)}"
        status = await status_of(session.token, request, path)
        if status == 429:
            return JSONResponse(error_body("too_many_requests", "this token's limit is reached: retry"), 429)
        if status != 200:
            return JSONResponse(error_body("forbidden", f"this session may not read app {app!r}"), status)
        if (refused := too_many_streams(session)) is not None:
            return refused
        series.start()

        async def events() -> AsyncIterator[bytes]:
            yield f"event: history\ndata: {json.dumps(series.history(app))}\n\n".encode()
            checked = time.monotonic()
            while not await request.is_disconnected():
                point = await series.next_point(app, SAMPLE_S * 5)
                if await signed_out(state.resources.store, session):
                    return  # signed out since it opened (in any tab, on any server)
                if time.monotonic() - checked > RECHECK_S:
                    checked = time.monotonic()
                    if await status_of(session.token, request, path) in (401, 403, 404):
                        return  # revoked, or the app gone: the stream ends
                yield (f"data: {json.dumps(point)}\n\n" if point else ": idle\n\n").encode()

        headers = {**SECURITY_HEADERS, "x-accel-buffering": "no"}
        return StreamingResponse(counted(session, events()), media_type="text/event-stream", headers=headers)

    async def overview_series(request: Request) -> Response:
        """Server-Sent Events: each new sample of every app this session may read (the overview's figures)."""
        session = await session_of(request)
        if session is None:
            return JSONResponse(error_body("unauthorized", "sign in at /ui/signin"), 401)

        async def visible(before: set[str]) -> set[str] | None:
            reader = ApiReader(api, session.token, request)
            try:
                status, body = await reader.get("/v1/apps")
            except Throttled:
                return before  # asked again at the next check
            finally:
                await reader.aclose()
            return {a["name"] for a in body["items"]} if status == 200 else None

        apps = await visible(set())
        if apps is None:
            return JSONResponse(error_body("unauthorized", "sign in at /ui/signin"), 401)
        if (refused := too_many_streams(session)) is not None:
            return refused
        series.start()

        async def events() -> AsyncIterator[bytes]:
            nonlocal apps
            checked = time.monotonic()
            while apps is not None and not await request.is_disconnected():
                points = await series.next_points(apps, SAMPLE_S * 5)
                if await signed_out(state.resources.store, session):
                    return  # signed out since it opened (in any tab, on any server)
                if time.monotonic() - checked > RECHECK_S:  # new apps, a revoked token
                    checked, apps = time.monotonic(), await visible(apps)
                yield (f"data: {json.dumps(points)}\n\n" if points else ": idle\n\n").encode()

        headers = {**SECURITY_HEADERS, "x-accel-buffering": "no"}
        return StreamingResponse(counted(session, events()), media_type="text/event-stream", headers=headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(error_body("not_found", "no such dashboard page"), 404, headers=SECURITY_HEADERS)

    routes = [
        Route("/ui", overview),
        Route("/ui/", overview),
        Route(SIGNIN, signin_form, methods=["GET"]),
        Route(SIGNIN, signin, methods=["POST"]),
        Route("/ui/link", link_form, methods=["GET"]),
        Route("/ui/link", link, methods=["POST"]),
        Route("/ui/signout", signout, methods=["POST"]),
        Route("/ui/series", overview_series),
        Route("/ui/apps/{app}", app_page),
        Route("/ui/apps/{app}/series", app_series),
        Route("/ui/apps/{app}/part/{part}", app_part),
        Route("/ui/deploys/{deploy}", deploy_page),
        Mount("/ui/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    ui = Starlette(routes=routes, exception_handlers={404: not_found})
    ui.state.series = series
    return ui


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _state(instances: list[dict[str, Any]], building: bool, app: dict[str, Any]) -> str:
    """serving, at zero, failing or building, as the overview names them."""
    phases = [i["status"]["phase"] for i in instances]
    if building:
        return "building"
    if any(p in ("backoff", "failed") for p in phases) and "ready" not in phases:
        return "failing"
    if "ready" in phases:
        return "serving"
    if app.get("current_release") is None:
        return "no release"
    return "starting" if phases else "at zero"
