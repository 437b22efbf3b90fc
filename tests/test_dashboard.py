"""The dashboard (`/ui`) in a real browser: Playwright drives Debian's chromium against the shared platform.

One browser for the module, on the session's platform (the suite's time budget). Screenshots of each
page go to test-artifacts/dashboard/ (ignored by git). The security parts are also tried with plain
HTTP (httpx): headers, cookie flags, CSRF, one-time links, what a stranger gets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
import weakref
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from playwright.sync_api import Browser, BrowserContext, Dialog, Page, sync_playwright

from osless.api.secrets import SecretBox
from osless.api.ui.routes import MAX_STREAMS
from osless.api.ui.session import COOKIE, MAX_CODES_PER_TOKEN, open_session, seal
from tests.platform import Platform, copy_app

APPS = Path(__file__).parent / "apps"
SHOTS = Path(__file__).parent.parent / "test-artifacts" / "dashboard"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = '"><img src=x onerror=alert(1)>'


@pytest.fixture(scope="module")
def dash(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """tests/apps/dashboard deployed twice (v1 says "one", v2 "two"), one instance kept up."""
    src = copy_app(APPS / "dashboard", tmp_path_factory.mktemp("dash") / "dashboard")
    first = platform.deploy(src)
    app_py = src / "app.py"
    app_py.write_text(app_py.read_text().replace('VERSION = "one"', 'VERSION = "two"'))
    second = platform.deploy_warm(src)
    yield {"v1": first, "v2": second}
    platform.cli("apps", "delete", "dash", "--yes")  # the session's platform goes on without it


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # A missing chromium fails here (scripts/install installs Debian's): never a skip.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/install (apt-get install chromium)"
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        # Each context Playwright makes is fresh (its own profile, no cookies): one per user here.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def admin(browser: Browser, platform: Platform, dash: dict[str, Any]) -> Iterator[Page]:
    """A page signed in with the admin token through the sign-in form."""
    context = browser.new_context(base_url=platform.api, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    complaints: list[str] = []  # the browser's console errors: a CSP violation, a script's failure
    page.on("console", lambda m: complaints.append(f"{page.url}: {m.text}") if m.type == "error" else None)
    page.on("response", lambda r: complaints.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("pageerror", lambda e: complaints.append(str(e)))
    page.complaints = complaints  # type: ignore[attr-defined]
    page.goto("/ui")
    assert page.url.endswith("/ui/signin")
    page.fill("#token", platform.token)
    page.press("#token", "Enter")  # the keyboard alone
    page.wait_for_url(re.compile(r"/ui$"))
    yield page
    context.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def opened(page: Page, path: str) -> None:
    """`path` opened, once its changes are on: a page just brought to the front takes no press for
    a moment (app.js; a double click's second click must not land on it)."""
    page.goto(path)
    page.wait_for_selector("html[data-settled]", state="attached")


def redeem(api: str, path: str, **kw: Any) -> httpx.Response:
    """What the link page's button does: post the link's code (opening the link spends nothing)."""
    code = path.rpartition("code=")[2]
    return httpx.post(f"{api}/ui/link", data={"code": code}, **kw)


def link(platform: Platform, token: str | None = None) -> str:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = platform.http("POST", "/v1/dashboard/links", headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["path"])


# What each client's sign-in handed over to keep (the CSRF value), as a browser's script keeps it in
# the dashboard origin's localStorage: pages never show it again.
KEPT: weakref.WeakKeyDictionary[httpx.Client, str] = weakref.WeakKeyDictionary()


def signed_in(r: httpx.Response) -> tuple[str, str]:
    """The session id and CSRF value the answer to a sign-in hands over, once, to the page's script."""
    assert r.status_code == 200 and "osless_session=" in r.headers["set-cookie"], r.text
    match = re.search(r'id="signedin" data-sid="([0-9a-f]{16})" data-csrf="([^"]+)"', r.text)
    assert match, r.text
    return match.group(1), match.group(2)


@contextlib.contextmanager
def session(platform: Platform, token: str | None = None) -> Iterator[httpx.Client]:
    """A plain HTTP client holding a dashboard session, opened with a one-time link."""
    with httpx.Client(base_url=platform.api, timeout=30) as client:
        r = client.post("/ui/link", data={"code": link(platform, token).rpartition("code=")[2]})
        KEPT[client] = signed_in(r)[1]
        yield client


def csrf_of(client: httpx.Client) -> str:
    return KEPT[client]


def sid_of(page: str) -> str:
    match = re.search(r'<meta name="osless-session" content="([0-9a-f]{16})">', page)
    assert match, page
    return match.group(1)


def current_release(platform: Platform) -> int:
    return int(platform.http("GET", "/v1/apps/dash").json()["current_release"])


def served(platform: Platform, query: str = "") -> str:
    return httpx.get(f"{platform.gateway}/dash/?{query}", timeout=30).text


def test_a_session_opens_only_from_what_was_sealed_as_one() -> None:
    box = SecretBox(Fernet.generate_key())
    value, made = seal(box, "osl_token")
    opened = open_session(box, value)
    assert opened is not None and opened.token == "osl_token" and opened.csrf == made.csrf
    assert "osl_token" not in value
    # The same key seals config secrets: one whose value looks like a session is still none.
    lookalike = box.encrypt(json.dumps({"t": "osl_token", "c": "x", "e": time.time() + 60}))
    assert open_session(box, lookalike) is None
    assert open_session(box, value[:-4] + "AAAA") is None  # tampered
    assert open_session(SecretBox(Fernet.generate_key()), value) is None  # another platform's key
    assert open_session(box, seal(box, "osl_token", ttl_s=-1)[0]) is None  # expired
    assert open_session(box, "x" * 5000) is None


# -- plain HTTP: what a stranger gets, and the session's protections -----------------------------------


def test_unauthenticated_pages_redirect_to_sign_in_with_no_data(
    platform: Platform, dash: dict[str, Any]
) -> None:
    deploy_id = dash["v2"]["id"]
    for path in ("/ui", "/ui/", "/ui/apps/dash", "/ui/apps/dash/part/config", f"/ui/deploys/{deploy_id}"):
        r = httpx.get(platform.api + path, cookies={"osless_session": "forged"})
        assert r.status_code == 303 and r.headers["location"] == "/ui/signin", path
        assert "dash" not in r.text and r.text == ""
    series = httpx.get(platform.api + "/ui/apps/dash/series")
    assert series.status_code == 401 and series.json()["error"]["code"] == "unauthorized"
    signin = httpx.get(platform.api + "/ui/signin")
    assert signin.status_code == 200 and "/ui/apps/dash" not in signin.text and "serving" not in signin.text
    # The forms read no more than a form's worth (these pages are in front of the API's body limit).
    for path in ("/ui/signin", "/ui/signout", "/ui/link"):
        assert httpx.post(platform.api + path, content=b"token=" + b"x" * 100_000).status_code == 413
    # The API's own routes: the cookie of no session opens nothing.
    assert httpx.get(platform.api + "/v1/apps", cookies={"osless_session": "forged"}).status_code == 401


def test_pages_forbid_framing_and_inline_script_and_the_cookie_is_strict(
    platform: Platform, dash: dict[str, Any]
) -> None:
    r = redeem(platform.api, link(platform))
    cookie = r.headers["set-cookie"]
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    value = SimpleCookie(cookie)["osless_session"].value
    assert platform.token not in value and platform.token[6:] not in value  # sealed, never in clear
    with session(platform) as client:
        page = client.get("/ui/apps/dash")
        assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    assert page.headers["cross-origin-opener-policy"] == "same-origin"
    assert "<script>" not in page.text and " on" not in re.sub(r"<(pre|code|td)[^>]*>.*?</\1>", "", page.text)
    assert platform.token not in page.text


def test_a_change_without_the_csrf_token_is_refused_with_a_clear_403(
    platform: Platform, dash: dict[str, Any]
) -> None:
    with session(platform) as client:
        before = current_release(platform)
        r = client.post("/v1/apps/dash/rollback")
        assert r.status_code == 403
        error = r.json()["error"]
        assert error["code"] == "csrf_failed" and "X-Osless-CSRF" in error["message"].replace(
            "x-osless-csrf", "X-Osless-CSRF"
        )
        csrf = csrf_of(client)
        evil = client.post(
            "/v1/apps/dash/rollback", headers={"x-osless-csrf": csrf, "origin": "http://evil.example"}
        )
        assert evil.status_code == 403 and evil.json()["error"]["code"] == "csrf_failed"
        wrong = client.post("/v1/apps/dash/rollback", headers={"x-osless-csrf": csrf + "x"})
        assert wrong.status_code == 403
        assert current_release(platform) == before
        # Reads need no CSRF token: the session reads as its token does.
        assert client.get("/v1/apps/dash").json()["name"] == "dash"


def test_a_one_time_link_opens_one_session_once(platform: Platform, dash: dict[str, Any]) -> None:
    path = link(platform)
    assert platform.token not in path
    opened = httpx.get(platform.api + path)  # a link preview: spends nothing, sets nothing
    assert opened.status_code == 200 and "set-cookie" not in opened.headers
    first = redeem(platform.api, path)
    signed_in(first)
    again = redeem(platform.api, path)
    assert again.status_code == 400 and "set-cookie" not in again.headers
    assert "used already or has expired" in again.text
    assert redeem(platform.api, "code=" + "A" * 32).status_code == 400
    # Posted from another site (login CSRF: the visitor signed in as the link's maker): refused.
    other = redeem(platform.api, link(platform), headers={"origin": "http://evil.example"})
    assert other.status_code == 403 and "set-cookie" not in other.headers


def test_each_sign_in_makes_a_new_session(platform: Platform, dash: dict[str, Any]) -> None:
    """Session fixation: whatever cookie a browser held before, signing in replaces it, with a new
    CSRF value; the old value does not pass with the new cookie."""
    with session(platform) as client:
        old_cookie, old_csrf = client.cookies["osless_session"], csrf_of(client)
        r = client.post("/ui/link", data={"code": link(platform).rpartition("code=")[2]})
        new_cookie, new_csrf = client.cookies["osless_session"], signed_in(r)[1]
        assert new_cookie != old_cookie and new_csrf != old_csrf
        refused = client.put("/v1/apps/dash/scale", json={"max": 10}, headers={"x-osless-csrf": old_csrf})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "csrf_failed"
        done = client.put("/v1/apps/dash/scale", json={"max": 10}, headers={"x-osless-csrf": new_csrf})
        assert done.status_code == 200, done.text


def test_api_answers_are_data_never_pages_of_the_apis_origin(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # The dashboard's session lives on the API's origin: an answer there that a browser would render
    # (a function's own content type, a profile's SVG) must run no script and never be framed.
    for r in (platform.http("GET", "/v1/apps"), httpx.get(platform.api + "/v1/apps")):
        assert r.headers["x-content-type-options"] == "nosniff", r.headers
        assert r.headers["content-security-policy"].startswith("sandbox;"), r.headers


def test_signing_out_beside_a_planted_cookie_still_ends_the_visitors_own_session(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # A page's script adds its author's session cookie beside the visitor's (a Path covering
    # /ui/signout): the sign-out, sent with the visitor's value, must still end the visitor's own
    # session everywhere, not only drop this browser's cookie while a copy keeps working.
    own = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-own")["token"]
    author = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-beside")["token"]
    with session(platform, own) as client, session(platform, author) as theirs:
        kept, planted = client.cookies[COOKIE], theirs.cookies[COOKIE]
        both = {"cookie": f"{COOKIE}={planted}; {COOKIE}={kept}"}
        r = httpx.post(f"{platform.api}/ui/signout", data={"csrf": csrf_of(client)}, headers=both)
        assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
        assert httpx.get(f"{platform.api}/v1/apps/dash", cookies={COOKIE: kept}).status_code == 401
        # The planted one is not the visitor's to end (its value never was in this browser).
        assert theirs.get("/v1/apps/dash").status_code == 200


def test_signing_out_ends_the_session_wherever_its_cookie_was_kept(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # The browser drops the cookie at sign-out, but a copy of it (another tab's, or one taken) must
    # not keep opening pages for 12 hours: the sign-out is kept server-side, for every server.
    made = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-signout")
    with session(platform, made["token"]) as client:
        kept = client.cookies[COOKIE]
        assert client.get("/v1/apps/dash").status_code == 200
        r = client.post("/ui/signout", data={"csrf": csrf_of(client)})
        assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
        page = httpx.get(platform.api + "/ui/apps/dash", cookies={COOKIE: kept})
        assert (
            page.status_code == 303 and page.headers["location"] == "/ui/signin" and "dash" not in page.text
        )
        assert httpx.get(platform.api + "/v1/apps/dash", cookies={COOKIE: kept}).status_code == 401
    with session(platform, made["token"]) as client:  # signing in again opens a new one
        assert client.get("/ui/apps/dash").status_code == 200


def test_signing_out_ends_the_live_views_already_open(platform: Platform, dash: dict[str, Any]) -> None:
    # A stream opened before the sign-out (another tab's, or one a copy of the cookie opened) would
    # otherwise go on sending the app's figures for as long as it is held open.
    token = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-signout-live")["token"]
    with session(platform, token) as client:
        csrf = csrf_of(client)
        with (
            client.stream("GET", "/ui/apps/dash/series") as live,
            client.stream("GET", "/ui/series") as overview,
        ):
            assert live.status_code == overview.status_code == 200
            lines = [live.iter_lines(), overview.iter_lines()]
            assert next(lines[0]).startswith("event: history")
            assert client.post("/ui/signout", data={"csrf": csrf}).status_code == 303
            started = time.monotonic()
            for stream in lines:
                for _ in stream:  # each ends at its next event (every 10 s at most), not at the client's will
                    assert time.monotonic() - started < 25


def test_signing_out_ends_an_api_stream_the_cookie_opened(platform: Platform, dash: dict[str, Any]) -> None:
    # A watch opened with a copy of the cookie (no browser: no Sec-Fetch-Site) must not outlive
    # the sign-out: it would go on telling its holder every change of the token's apps.
    token = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-signout-watch")["token"]
    with session(platform, token) as client:
        kept = client.cookies[COOKIE]
        csrf = csrf_of(client)
        with httpx.stream(
            "GET", platform.api + "/v1/apps?watch=true", cookies={COOKIE: kept}, timeout=30
        ) as watch:
            assert watch.status_code == 200
            assert client.post("/ui/signout", data={"csrf": csrf}).status_code == 303
            started = time.monotonic()
            for _ in watch.iter_lines():  # bookmarks every 10 s until it ends
                assert time.monotonic() - started < 20
    with httpx.stream("GET", platform.api + "/v1/apps?watch=true", cookies={COOKIE: kept}) as watch:
        assert watch.status_code == 401


def test_a_revoked_token_ends_its_session(platform: Platform, dash: dict[str, Any]) -> None:
    made = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-revoked")
    with session(platform, made["token"]) as client:
        assert client.get("/ui/apps/dash").status_code == 200
        platform.cli("tokens", "revoke", made["id"])
        gone = platform.wait_for(
            lambda: (r := client.get("/ui/apps/dash")).status_code == 303 and r, what="the session to end"
        )
        assert gone.headers["location"] == "/ui/signin" and "dash" not in gone.text
        assert client.get("/v1/apps/dash").status_code == 401


def test_a_log_tail_ends_when_its_token_is_revoked(platform: Platform, dash: dict[str, Any]) -> None:
    made = platform.cli_json("tokens", "create", "--role", "debug", "--name", "dash-tail")
    with (
        session(platform, made["token"]) as client,
        client.stream("GET", "/v1/apps/dash/logs", params={"follow": "true", "tail": "1"}) as tail,
    ):
        assert tail.status_code == 200
        platform.cli("tokens", "revoke", made["id"])
        revoked = time.monotonic()
        for _ in tail.iter_bytes():  # the API ends it; else the read times out (30 s) and fails
            pass
        assert time.monotonic() - revoked < 20


def test_a_token_that_is_no_header_value_is_refused_at_sign_in(platform: Platform) -> None:
    for token in ("osl_é", "osl_a\r\nX-Osless-CSRF: x"):
        r = httpx.post(f"{platform.api}/ui/signin", data={"token": token})
        assert r.status_code == 401 and "that token was refused" in r.text, token


def test_an_app_on_the_apis_host_never_gets_the_dashboards_session(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # A browser sends a host's cookies to each of its ports: to the apps the gateway serves there too.
    # An app holding the session would read the pages' CSRF value and change anything as its signer.
    sealed = SimpleCookie(redeem(platform.api, link(platform)).headers["set-cookie"])[COOKIE].value
    cookies = {"cookie": f"theirs=1; {COOKIE}={sealed}; also=2"}
    assert (
        httpx.get(f"{platform.gateway}/dash/?cookies", headers=cookies, timeout=30).text == "theirs=1; also=2"
    )
    alone = {"cookie": f"{COOKIE}={sealed}"}
    assert httpx.get(f"{platform.gateway}/dash/?cookies", headers=alone, timeout=30).text == ""


def test_an_app_on_the_apis_host_cannot_plant_a_session(platform: Platform, dash: dict[str, Any]) -> None:
    # A browser takes a cookie from any port of a host for all of them: an app setting the session
    # would have the visitor's dashboard signed in as the app's author (what they type, the author's).
    r = httpx.get(f"{platform.gateway}/dash/?setcookie", timeout=30)
    assert r.status_code == 200 and r.headers.get_list("set-cookie") == ["theirs=kept; Path=/"]
    assert COOKIE not in r.headers.get("set-cookie", "")


def test_two_session_cookies_open_nothing(platform: Platform, dash: dict[str, Any]) -> None:
    # A page's script on the gateway's port of this host can add a second session cookie beside the
    # visitor's HttpOnly one (`document.cookie` with a Domain or a Path), which the browser sends
    # too; taking either would be a guess, and the last (what Starlette takes) may be the planted one.
    with session(platform) as own, session(platform) as other:
        both = f"{COOKIE}={own.cookies[COOKIE]}; {COOKIE}={other.cookies[COOKIE]}"
        page = httpx.get(platform.api + "/ui/apps/dash", headers={"cookie": both})
        assert page.status_code == 303 and page.headers["location"] == "/ui/signin"
        assert httpx.get(platform.api + "/v1/apps/dash", headers={"cookie": both}).status_code == 401
        assert (
            httpx.get(platform.api + "/ui/apps/dash", cookies={COOKIE: own.cookies[COOKIE]}).status_code
            == 200
        )
        # Signing in replaces this site's own cookie only: the sign-in page says what to do.
        signin = httpx.get(platform.api + "/ui/signin", headers={"cookie": both})
        assert signin.status_code == 200 and "two dashboard session cookies" in signin.text
        alone = httpx.get(platform.api + "/ui/signin", cookies={COOKIE: own.cookies[COOKIE]})
        assert "two dashboard session cookies" not in alone.text


def test_pages_name_their_session_and_never_show_its_csrf_value(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # The value is handed over once, at sign-in: a page that showed it would hand it to whoever's
    # session the cookie is, a planted one too (login CSRF: the visitor's changes, the planter's).
    with session(platform) as client:
        csrf = csrf_of(client)
        sid = hashlib.sha256(csrf.encode()).hexdigest()[:16]
        for path in ("/ui", "/ui/apps/dash", f"/ui/deploys/{dash['v2']['id']}", "/ui/apps/nope"):
            page = client.get(path).text
            assert csrf not in page and sid_of(page) == sid, path
        for part in ("settings", "instances"):
            assert csrf not in client.get(f"/ui/apps/dash/part/{part}").text


def test_a_sign_out_without_the_csrf_value_forgets_this_browsers_cookie_only(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # The way out for a visitor holding a planted session (their pages have no value to send):
    # the cookie goes from their browser, and the session's owner stays signed in elsewhere.
    with session(platform) as owner:
        planted = owner.cookies[COOKIE]
        r = httpx.post(f"{platform.api}/ui/signout", data={"csrf": ""}, cookies={COOKIE: planted})
        assert r.status_code == 303 and r.headers["location"] == "/ui/signin"
        assert r.headers["set-cookie"].startswith(f"{COOKIE}=;") and "Max-Age=0" in r.headers["set-cookie"]
        assert owner.get("/ui/apps/dash").status_code == 200


def test_a_link_page_says_whose_token_it_signs_in_with(platform: Platform, dash: dict[str, Any]) -> None:
    # A link an app's page offers may be its author's: one click would sign the visitor in as them.
    token = platform.cli_json("tokens", "create", "--role", "deploy", "--name", "dash-linker")["token"]
    path = link(platform, token)
    shown = httpx.get(platform.api + path)
    assert shown.status_code == 200 and "set-cookie" not in shown.headers
    assert re.search(r"as <strong>dash-linker</strong>\s*\(deploy\)", shown.text), shown.text
    signed_in(redeem(platform.api, path))  # shown, not spent
    gone = httpx.get(platform.api + path)
    assert (
        gone.status_code == 400
        and "used already or has expired" in gone.text
        and "dash-linker" not in gone.text
    )
    assert httpx.get(platform.api + "/ui/link?code=" + "A" * 32).status_code == 400


def test_a_link_page_warns_a_browser_signed_in_with_another_token(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # Names are the admin's choice and need not be unique (every unnamed deploy token is "deploy"):
    # a planter's link may show the visitor's own name. Whether the token is another one than this
    # browser's session's, the server tells; a match says nothing (that session may be planted).
    same = platform.cli_json("tokens", "create", "--role", "deploy")["token"]
    other = platform.cli_json("tokens", "create", "--role", "deploy")["token"]
    with session(platform, same) as client:
        assert 'id="link-other"' not in client.get(link(platform, same)).text
        theirs = client.get(link(platform, other)).text
        assert 'id="link-other"' in theirs and re.search(r"as <strong>deploy</strong>\s*\(deploy\)", theirs)
    stranger = httpx.get(platform.api + link(platform, other)).text  # no session: nothing to compare
    assert 'id="link-other"' not in stranger


def test_a_link_pages_continue_waits_until_the_page_was_seen(
    browser: Browser, platform: Platform, dash: dict[str, Any]
) -> None:
    # A page of another port opens its author's link under a key the visitor holds (or between the
    # two clicks of a double click): the button is neither focused nor on at first, so that press
    # spends nothing; a moment later it signs in.
    context = browser.new_context(base_url=platform.api)
    try:
        page = context.new_page()
        page.goto(link(platform))
        button = page.locator("#link-continue")
        assert button.is_disabled() and not page.evaluate("document.activeElement.id === 'link-continue'")
        page.keyboard.press("Enter")
        page.keyboard.press("Space")
        button.click(force=True)  # a click that lands at once
        assert "/ui/link" in page.url and not [c for c in context.cookies() if c["name"] == COOKIE]
        page.wait_for_selector("#link-continue:enabled", timeout=5_000)
        button.click()
        page.wait_for_url(re.compile(r"/ui$"))
        assert [c for c in context.cookies() if c["name"] == COOKIE]
    finally:
        context.close()


def test_a_session_is_read_whatever_other_cookies_the_host_has(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # Any site of the host may set cookies; one with a JSON value or a space must not hide the session
    # from the API's routes while the pages still read it.
    sealed = SimpleCookie(redeem(platform.api, link(platform)).headers["set-cookie"])[COOKIE].value
    for other in ('prefs={"theme":"dark"}', "name=a b", 'odd="\\"'):
        headers = {"cookie": f"{other}; {COOKIE}={sealed}"}
        assert httpx.get(f"{platform.api}/v1/apps/dash", headers=headers).status_code == 200, other
        assert httpx.get(f"{platform.api}/ui/apps/dash", headers=headers).status_code == 200, other


def test_what_another_port_of_the_host_loads_gets_no_session(
    platform: Platform, dash: dict[str, Any]
) -> None:
    # An app's page on the gateway's port is same-site: the strict cookie comes with the images and
    # streams it loads. It reads none of them, but it must not spend its visitor's token on them.
    loaded = {"sec-fetch-site": "same-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    ours = {"sec-fetch-site": "same-origin", "sec-fetch-mode": "cors", "sec-fetch-dest": "empty"}
    with session(platform) as client:
        assert client.get("/v1/apps/dash", headers=loaded).status_code == 401
        assert client.get("/ui/apps/dash/series", headers=loaded).status_code == 401
        assert client.get("/ui/apps/dash", headers=loaded).headers.get("location") == "/ui/signin"
        assert client.get("/v1/apps/dash", headers=ours).status_code == 200
        opened = {"sec-fetch-site": "same-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
        assert client.get("/ui/apps/dash", headers=opened).status_code == 200  # a link followed


def test_no_form_of_a_page_would_put_its_fields_in_a_url(platform: Platform, dash: dict[str, Any]) -> None:
    # Submitted before the script runs (or without it), a form without a method is a GET: the config
    # form's secrets would go into the address, the history and the server's logs.
    with session(platform) as client:
        page = client.get("/ui/apps/dash").text
    forms = re.findall(r"<form\b[^>]*>", page)
    assert 'type="password"' in page and len(forms) >= 3  # the config form has a secret
    assert all('method="post"' in form for form in forms if 'id="logform"' not in form), forms


def test_one_token_cannot_take_every_sign_in_link(platform: Platform, dash: dict[str, Any]) -> None:
    hoarder = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-hoarder")["token"]
    for _ in range(MAX_CODES_PER_TOKEN):
        link(platform, hoarder)
    r = platform.http("POST", "/v1/dashboard/links", headers={"authorization": f"Bearer {hoarder}"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_links"
    assert link(platform).startswith("/ui/link?code=")  # others' links still come


def test_a_token_holds_a_bounded_number_of_live_streams(platform: Platform, dash: dict[str, Any]) -> None:
    token = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-streams")["token"]
    with session(platform, token) as client, contextlib.ExitStack() as open_streams:
        reading = []  # kept: an iterator dropped closes its stream
        for _ in range(MAX_STREAMS):
            r = open_streams.enter_context(client.stream("GET", "/ui/apps/dash/series"))
            assert r.status_code == 200
            reading.append(r.iter_bytes())
            assert next(reading[-1]).startswith(b"event: history")  # under way: counted
        r = client.get("/ui/apps/dash/series")
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_streams"
        assert client.get("/ui/series").status_code == 429


def test_an_idle_apps_chart_history_stays_two_samples(platform: Platform, dash: dict[str, Any]) -> None:
    # Apps are cheap to make (no deploy needed): each API process must not keep an hour of
    # samples for every app someone named, only for what moves.
    assert platform.http("POST", "/v1/apps", json={"name": "dash-idle"}).status_code == 201
    try:
        with session(platform) as client:

            def samples(live: int) -> list[Any]:
                """The stream's history, after reading `live` new samples."""
                history: list[Any] = []
                with client.stream("GET", "/ui/apps/dash-idle/series") as r:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and not history:
                            history = json.loads(line[6:])
                        elif line.startswith("data: "):
                            live -= 1
                        if history and live <= 0:
                            return history
                return history

            samples(2)  # with the one it had, three samples of it taken by now
            history = samples(0)
            assert 1 <= len(history) <= 2 and all(p[1:] == history[-1][1:] for p in history), history
    finally:
        platform.cli("apps", "delete", "dash-idle", "--yes")


def test_osless_up_and_osless_dashboard_print_a_one_time_link(
    platform: Platform, dash: dict[str, Any]
) -> None:
    printed = re.search(r"Dashboard: (http://\S+/ui/link\?code=\S+)", platform.output())
    assert printed and platform.token not in printed.group(1), platform.output()[-2000:]
    url = platform.cli_json("dashboard")["url"]
    assert url.startswith(f"{platform.api}/ui/link?code=") and platform.token not in url
    signed_in(redeem(platform.api, url))
    assert redeem(platform.api, url).status_code == 400


# -- in the browser -----------------------------------------------------------------------------------


def test_sign_in_and_see_the_deployed_app(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    admin.goto("/ui")
    row = admin.locator("#apps tr", has_text="dash")
    assert row.count() == 1
    assert "serving" in row.inner_text() or "starting" in row.inner_text()
    assert admin.locator("#nodes tbody tr").count() >= 1
    assert admin.locator("#changes").count() == 1  # an admin sees the audit log's recent writes
    shot(admin, "overview")


def test_request_chart_moves_while_a_load_runs(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    admin.goto("/ui/apps/dash")
    chart = admin.locator('[data-chart="requests"]')
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                client.get(f"{platform.gateway}/dash/?load")
                time.sleep(0.02)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        # The chart's newest sample (`data-last`: 2xx-3xx/s, 4xx/s, 5xx/s) shows the load arrive.
        admin.wait_for_function(
            """() => { const el = document.querySelector('[data-chart="requests"]');
                       return el.dataset.last && JSON.parse(el.dataset.last)[0] > 1; }""",
            timeout=30_000,
        )
        assert int(chart.get_attribute("data-points") or 0) >= 1
        assert float(admin.locator("#now-rps").inner_text()) > 0
        shot(admin, "app")
        # The overview's figures follow too (its own stream), without a reload.
        admin.goto("/ui")
        admin.wait_for_function(
            """() => { const td = document.querySelector('tr[data-app="dash"] [data-field="rps"]');
                       return td && parseFloat(td.textContent) > 1 && td.dataset.live !== undefined; }""",
            timeout=30_000,
        )
    finally:
        stop.set()
        thread.join()


def test_edit_a_config_value_and_see_it_live_in_the_app(
    admin: Page, platform: Platform, dash: dict[str, Any]
) -> None:
    opened(admin, "/ui/apps/dash#config")
    admin.fill("#cfg-greeting", "bonjour from the dashboard")
    admin.click("#config button[type=submit]")
    # The section is drawn again from the API once the change is made (htmx), with the new version.
    admin.wait_for_selector("#config td:has-text('set greeting')")
    platform.wait_for(
        lambda: "greeting=bonjour from the dashboard" in served(platform), what="the new greeting"
    )
    # The change is the REST API's, in the audit log as the token's, like a CLI change.
    audit = platform.http("GET", "/v1/audit", params={"app": "dash", "limit": 20}).json()["items"]
    assert any(
        e["method"] == "PATCH" and e["path"] == "/v1/apps/dash/config" and e["status"] == 200 for e in audit
    )
    # A secret is write-only: set through the form, never shown back.
    admin.fill("#cfg-api_key", "s3cret-in-the-form")
    admin.click("#config button[type=submit]")
    admin.wait_for_selector("#cfg-api_key[placeholder^='(set']")
    assert "s3cret-in-the-form" not in admin.content()
    # App-controlled text in a value stays text.
    admin.fill("#cfg-greeting", XSS)
    admin.click("#config button[type=submit]")
    admin.wait_for_selector("#config small:has-text('version')")
    platform.wait_for(lambda: XSS in served(platform), what="the markup greeting")
    admin.reload()
    assert admin.locator("#cfg-greeting").input_value() == XSS
    assert admin.locator("img[src=x]").count() == 0
    shot(admin, "config")


def test_roll_back_a_release_after_confirming(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    opened(admin, "/ui/apps/dash#releases")
    before = current_release(platform)
    asked: list[str] = []

    def answer(dialog: Dialog) -> None:
        asked.append(dialog.message)
        dialog.accept() if len(asked) > 1 else dialog.dismiss()

    admin.on("dialog", answer)
    try:
        admin.click("#releases button:has-text('Roll back')")  # dismissed: nothing happens
        time.sleep(0.5)
        assert current_release(platform) == before
        admin.click("#releases button:has-text('Roll back')")
        platform.wait_for(lambda: current_release(platform) == before + 1, what="the rollback release")
    finally:
        admin.remove_listener("dialog", answer)
    assert len(asked) == 2 and "Roll dash back" in asked[0]
    platform.wait_for(lambda: "version=one" in served(platform), what="v1's code serving again", timeout=60)
    admin.wait_for_selector("#releases tr.current")
    shot(admin, "releases")


def test_read_a_log_line_the_app_just_printed(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    admin.goto("/ui/apps/dash#logs")
    admin.fill("#logform input[name=grep]", "dash served")
    admin.click("#logform button[type=submit]")
    marker = f"marker-{time.time_ns()}"
    # The line is the app's: markup in it must arrive as text.
    platform.wait_for(lambda: served(platform, f"{marker}{XSS}") != "", what="a request")
    admin.wait_for_selector(f"#logtail div:has-text('{marker}')", timeout=30_000)
    line = admin.locator("#logtail div", has_text=marker).first
    assert f"dash served {marker}{XSS}" in line.inner_text()
    assert admin.locator("#logtail img").count() == 0
    shot(admin, "logs")


def test_a_deploys_build_log_is_shown(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    deploy_id = platform.http("GET", "/v1/apps/dash/releases").json()["items"][0]["deploy_id"]
    admin.goto(f"/ui/deploys/{deploy_id}")
    admin.wait_for_selector("#buildlog div:has-text('==> Building dash')")
    admin.wait_for_selector("#deploy-status:has-text('succeeded')")
    shot(admin, "deploy")


def test_edit_the_scale_policy(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    opened(admin, "/ui/apps/dash#scale")
    admin.fill("#scale input[name=max]", "7")
    admin.fill("#scale input[name=idle_s]", "90")
    admin.click("#scale button[type=submit]")
    admin.wait_for_selector("#scale input[name=max][value='7']")  # drawn again from the API
    got = platform.http("GET", "/v1/apps/dash").json()
    assert got["max"] == 7 and got["autoscale"]["idle_s"] == 90 and got["min"] == 1


def test_invoke_a_function_from_its_form(admin: Page, platform: Platform, dash: dict[str, Any]) -> None:
    opened(admin, "/ui/apps/dash#functions")
    admin.click("#functions summary:has-text('echo')")
    admin.fill("#event-echo", '{"n": 7}')
    admin.click("#functions form button[type=submit]")
    admin.wait_for_selector("#result-echo:has-text('\"n\": 7')")


def test_a_page_just_brought_to_the_front_takes_no_press(
    admin: Page, platform: Platform, dash: dict[str, Any]
) -> None:
    # Framing is refused, but a page of another port can open a dashboard page in the window the
    # second click of a double click lands on (a popup closed on the first: DoubleClickjacking).
    opened(admin, "/ui/apps/dash")
    admin.click("#functions summary:has-text('echo')")
    admin.fill("#event-echo", '{"n": 9}')
    admin.evaluate("window.dispatchEvent(new Event('focus'))")  # the window comes to the front
    admin.click("#functions form button[type=submit]")
    admin.wait_for_selector("#notice:has-text('press again')")
    assert '"n": 9' not in admin.locator("#result-echo").inner_text()
    admin.wait_for_selector("html[data-settled]", state="attached")
    admin.click("#functions form button[type=submit]")
    admin.wait_for_selector("#result-echo:has-text('\"n\": 9')")


def test_a_read_only_token_sees_no_change_buttons_and_the_api_refuses_its_changes(
    browser: Browser, platform: Platform, dash: dict[str, Any]
) -> None:
    made = platform.cli_json("tokens", "create", "--role", "read", "--name", "dash-reader")
    token = made["token"]
    context: BrowserContext = browser.new_context(
        base_url=platform.api, viewport={"width": 390, "height": 844}
    )
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(link(platform, token))
        page.click("#link-continue")  # on after a second: the click waits for it
        page.wait_for_url(re.compile(r"/ui$"))
        page.goto("/ui/apps/dash")
        for section in ("#releases", "#config", "#scale", "#functions"):
            assert page.locator(f"{section} button").count() == 0, section
        assert page.locator("#logform").count() == 0  # `read` may not read logs
        assert page.locator("#cfg-greeting").is_disabled()
        shot(page, "read-only-phone")
        # The API refuses the change anyway, with the session's own CSRF token.
        before = current_release(platform)
        refused = page.evaluate(
            """async () => {
                const csrf = JSON.parse(localStorage.getItem('osless-session')).csrf;
                const headers = {'X-Osless-CSRF': csrf};
                const r = await fetch('/v1/apps/dash/rollback', {method: 'POST', headers});
                return [r.status, await r.json()];
            }"""
        )
        assert refused[0] == 403 and refused[1]["error"]["code"] == "forbidden", refused
        assert current_release(platform) == before
        page.click("header button:has-text('Sign out')")
        page.wait_for_url(re.compile(r"/ui/signin$"))
        page.goto("/ui/apps/dash")
        assert page.url.endswith("/ui/signin") and not context.cookies()
    finally:
        context.close()


def test_a_session_an_apps_page_planted_changes_nothing_until_the_visitor_signs_in(
    browser: Browser, platform: Platform, dash: dict[str, Any]
) -> None:
    # An app's page on the gateway's port of the API's host sets the dashboard's cookie to its
    # author's session (the gateway strips Set-Cookie, not a script's `document.cookie`). A visitor
    # not signed in then opens the author's dashboard: what they change there would be the author's.
    author = platform.cli_json("tokens", "create", "--role", "deploy", "--name", "dash-planter")["token"]
    with session(platform, author) as theirs:
        planted = theirs.cookies[COOKIE]
        context = browser.new_context(base_url=platform.api)
        try:
            page = context.new_page()
            page.set_default_timeout(20_000)
            page.goto(f"{platform.gateway}/dash/?plant={planted}")
            assert [c["value"] for c in context.cookies() if c["name"] == COOKIE] == [planted]
            opened(page, "/ui/apps/dash")
            assert "dash-planter" in page.locator("header .who").inner_text()
            page.wait_for_selector("#unbound", state="visible")
            shot(page, "planted")
            # A change from the page is not sent; sent by hand, the API refuses it.
            page.click("#functions summary:has-text('echo')")
            page.fill("#event-echo", '{"n": 7}')
            page.click("#functions form button[type=submit]")
            page.wait_for_selector("#result-echo:has-text('Changes are off')")
            sent = page.evaluate(
                """async () => Promise.all([{}, {'X-Osless-CSRF': 'guess'}].map(async (headers) => {
                    const r = await fetch('/v1/apps/dash/functions/echo:invoke',
                                          {method: 'POST', headers, body: '{}'});
                    return [r.status, (await r.json()).error.code];
                }))"""
            )
            assert sent == [[403, "csrf_failed"], [403, "csrf_failed"]], sent
            # Signing in from there replaces the session, and changes work.
            page.click("#unbound a:has-text('Sign in again')")
            page.fill("#token", platform.token)
            page.press("#token", "Enter")
            page.wait_for_url(re.compile(r"/ui$"))
            opened(page, "/ui/apps/dash")
            assert "dash-planter" not in page.locator("header .who").inner_text()
            assert page.locator("#unbound").is_hidden()
            page.click("#functions summary:has-text('echo')")
            page.fill("#event-echo", '{"n": 8}')
            page.click("#functions form button[type=submit]")
            page.wait_for_selector("#result-echo:has-text('\"n\": 8')")
            # The session now held is HttpOnly: the app's page cannot plant over it.
            mine = [c["value"] for c in context.cookies() if c["name"] == COOKIE]
            page.goto(f"{platform.gateway}/dash/?plant={planted}")
            assert [c["value"] for c in context.cookies() if c["name"] == COOKIE] == mine != [planted]
        finally:
            context.close()


def test_a_running_deploys_build_log_streams(
    admin: Page, platform: Platform, dash: dict[str, Any], tmp_path: Path
) -> None:
    src = copy_app(APPS / "dashboard", tmp_path / "dashboard")
    step = "import time\nprint('step one', flush=True)\ntime.sleep(3)\nprint('step two', flush=True)\n"
    (src / "slow_step.py").write_text(step)
    app_py = src / "app.py"
    app_py.write_text(app_py.read_text().replace('App("dash")', 'App("dash", build=["python slow_step.py"])'))
    deploy = platform.upload(src)
    admin.goto(f"/ui/deploys/{deploy['id']}")
    # When each line reached the page: streamed, they arrive seconds apart, as printed.
    admin.evaluate(
        """() => { window.seen = {}; new MutationObserver(() => {
               for (const d of document.querySelectorAll('#buildlog div'))
                   if (!(d.textContent in window.seen)) window.seen[d.textContent] = Date.now();
           }).observe(document.getElementById('buildlog'), {childList: true}); }"""
    )
    admin.wait_for_selector("#deploy-status:has-text('succeeded')", timeout=60_000)
    seen = admin.evaluate("() => window.seen")
    one = next(t for line, t in seen.items() if line.endswith("step one"))
    two = next(t for line, t in seen.items() if line.endswith("step two"))
    assert two - one > 2000, seen
    shot(admin, "deploy-streamed")


def test_no_page_broke_its_content_security_policy_or_threw(admin: Page) -> None:
    """Every page the admin saw ran with no inline script or style refused and no script error."""
    complaints = admin.complaints  # type: ignore[attr-defined]
    assert not complaints, "\n".join(complaints)
