"""The dashboard's sessions: a sealed cookie after a token sign-in, its CSRF value, one-time sign-in codes.

The cookie holds the token encrypted with the platform's key (Fernet, `SecretBox`), never in clear,
so any server sharing the key (a cluster) reads it and nothing is kept per process. It is HttpOnly
and SameSite=Strict; a change also needs the session's CSRF value in a header (`X-Osless-CSRF`).
That value is handed to the browser once, by the answer to the sign-in, whose script keeps it in the
dashboard origin's `localStorage`; pages show only the session's id (`Session.sid`). A cookie any
page of this host can set (another port's, by `document.cookie`), but not that storage: a session
planted so opens pages the visitor's script will not change anything from, and the API refuses a
change without the value. A new session (new CSRF value) is made at each sign-in, so a cookie
planted before it is worth nothing after (session fixation).

Signing out ends every session of the token, in every browser (`sign_out`): the cookie is the
client's to keep, so the store keeps, per token that signed out (a digest of it), when it last did,
and a session made before that is refused (`signed_out`). A record goes once no session it could
refuse is alive (12 h); there is at most one per token that signed out.

One-time codes (`osless dashboard`, `osless up`) are stored by their sha256 in `/uicodes/`, with
the token encrypted and an expiry; redeeming deletes the record with a compare-and-swap, so a
code opens one session once, on any server.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import cookie_parser

from osless.api.secrets import SecretBox
from osless.store import Conflict, KeyValue, Store

__all__ = [
    "CODE_TTL_S",
    "COOKIE",
    "CSRF_HEADER",
    "MAX_CODES",
    "MAX_CODES_PER_TOKEN",
    "PEOPLE",
    "SESSION_TTL_S",
    "Session",
    "TooManyCodes",
    "cookie_header",
    "from_our_pages",
    "make_code",
    "open_session",
    "owns",
    "peek_code",
    "redeem_code",
    "same_origin",
    "seal",
    "session_cookie",
    "session_cookie_values",
    "session_cookies",
    "sign_out",
    "signed_out",
]

COOKIE = "osless_session"
CSRF_HEADER = "x-osless-csrf"
SESSION_TTL_S = 12 * 3600
PURPOSE = "osless dashboard session\0"  # sealed by the key that seals secrets too: told apart
CODE_TTL_S = 120.0
CODE_PREFIX = "/uicodes/"
SIGNOUT_PREFIX = "/uisignouts/"
# Links made and not yet used, over all tokens: each is a store key until used or expired, and a
# token's requests are throttled, not its links: bounded here (a person needs one at a time).
MAX_CODES = 256
# Of those, one token's: else one token (a `read` one will do) holds all 256 and nobody else gets
# a link for as long as it keeps asking.
MAX_CODES_PER_TOKEN = 8
MAX_COOKIE = 4096
# The roles that sign in: people's tokens. The platform's parts and apps have no business here.
PEOPLE = frozenset(
    {"admin", "deploy", "read", "debug", "invoke"}
)  # a browser keeps no more; anything longer is not ours


@dataclass(frozen=True)
class Session:
    token: str
    csrf: str
    expires: float
    issued: float  # when it was sealed: a sign-out after it ends it

    def csrf_ok(self, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(self.csrf.encode(), (sent or "").encode())

    @property
    def sid(self) -> str:
        """The session's id, shown in its pages: it tells which session the browser's stored CSRF
        value belongs to, and gives nothing of that value away."""
        return hashlib.sha256(self.csrf.encode()).hexdigest()[:16]


def seal(box: SecretBox, token: str, ttl_s: float = SESSION_TTL_S) -> tuple[str, Session]:
    """A new session for `token`: the cookie's value and what it holds."""
    now = time.time()
    session = Session(token=token, csrf=secrets.token_urlsafe(24), expires=now + ttl_s, issued=now)
    sealed = {"t": session.token, "c": session.csrf, "e": session.expires, "i": session.issued}
    value = box.encrypt(PURPOSE + json.dumps(sealed))
    return value, session


def open_session(box: SecretBox, cookie: str | None) -> Session | None:
    """The session a cookie holds, or None (absent, forged, made with another key, or expired)."""
    if not cookie or len(cookie) > MAX_COOKIE:
        return None
    try:
        plain = box.decrypt(cookie)
        if not plain.startswith(PURPOSE):
            return None  # something else this key sealed (a config secret): never a session
        data = json.loads(plain[len(PURPOSE) :])
        expires = float(data["e"])
        issued = float(data.get("i", expires - SESSION_TTL_S))  # sealed before sessions said it
        session = Session(token=str(data["t"]), csrf=str(data["c"]), expires=expires, issued=issued)
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires > time.time() else None


def session_cookie(raw: str | None) -> str | None:
    """The session's value in a `Cookie` header, read as Starlette reads it (`http.cookies` stops
    at the first cookie it finds malformed, and any site of this host may set one); None if two
    name it. A page's script on another port of this host may add one (`document.cookie`, with a
    Domain or another Path: the browser keeps both), and Starlette would take the last: its author's
    session, planted, in place of the visitor's own."""
    if not raw or session_cookies(raw) > 1:
        return None
    return cookie_parser(raw).get(COOKIE)


def session_cookies(raw: str | None) -> int:
    """How many cookies of a `Cookie` header are named as the session."""
    return len(session_cookie_values(raw))


def session_cookie_values(raw: str | None) -> list[str]:
    """The values of the cookies of a `Cookie` header named as the session, in the header's order."""
    pairs = (pair.partition("=") for pair in (raw or "").split(";"))
    return [value.strip() for name, _, value in pairs if name.strip() == COOKIE]


def cookie_header(value: str, *, secure: bool, max_age: int = SESSION_TTL_S) -> str:
    # Path=/: the API's /v1 routes read it too (the dashboard's changes go through them).
    parts = [f"{COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def same_origin(headers: Mapping[str, str]) -> bool:
    """An `Origin` header, when the browser sends one, names this host (a page of ours). Scheme
    aside: behind a proxy that ends TLS, the page is https and this server hears http."""
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == headers.get("host", "") != ""


def from_our_pages(headers: Mapping[str, str]) -> bool:
    """Whether the session cookie may speak for this request: no browser sent it, or the browser says
    it comes from a page of this origin or an address typed, or it opens a page (a navigation). A
    page on another port of this host is same-site, so the strict cookie comes with what it loads
    (an image, a stream): it could read none of it, but would spend the token's requests and live
    views for its owner."""
    site = headers.get("sec-fetch-site")
    if site is None or site in ("same-origin", "none"):
        return True
    return headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"


def _owner(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:32]


async def signed_out(store: Store, session: Session) -> bool:
    """Its token signed out (in any browser, on any server) after this session was made."""
    kv = await store.get(SIGNOUT_PREFIX + _owner(session.token))
    if kv is None:
        return False
    try:
        return session.issued <= float(json.loads(kv.value)["at"])
    except (ValueError, KeyError, TypeError):
        return True  # a record not ours to read: refused rather than guessed


async def sign_out(store: Store, session: Session) -> None:
    """End every session of `session`'s token made until now; forget records nothing needs."""
    now = time.time()
    await store.put(SIGNOUT_PREFIX + _owner(session.token), json.dumps({"at": now}).encode())
    items, _ = await store.list(SIGNOUT_PREFIX)
    for kv in items:
        try:
            stale = float(json.loads(kv.value)["at"]) < now - SESSION_TTL_S
        except (ValueError, KeyError, TypeError):
            stale = True
        if stale:
            with contextlib.suppress(Conflict):  # signed out again meanwhile: kept
                await store.delete(kv.key, if_revision=kv.mod_revision)


def _code_key(code: str) -> str:
    return CODE_PREFIX + hashlib.sha256(code.encode()).hexdigest()


class TooManyCodes(Exception):
    """`MAX_CODES` sign-in links wait to be used: no more until some are used or expire."""


async def make_code(
    store: Store, box: SecretBox, token: str, who: Mapping[str, str | None], ttl_s: float = CODE_TTL_S
) -> str:
    """A code that opens one session for `token`, once, within `ttl_s`; `who` (the token's name,
    role, app) is what the link's page shows before it is used (`peek_code`)."""
    owner = _owner(token)
    live = await _forget_expired(store)
    if len(live) >= MAX_CODES or live.count(owner) >= MAX_CODES_PER_TOKEN:
        raise TooManyCodes
    code = secrets.token_urlsafe(24)
    record = {"token": box.encrypt(token), "expires": time.time() + ttl_s, "owner": owner, "who": dict(who)}
    await store.put(_code_key(code), json.dumps(record).encode())
    return code


async def _live_code(store: Store, code: str) -> tuple[KeyValue, dict[str, Any]] | None:
    """A code's record while it is good (not used, not expired); None otherwise, or if unreadable.
    An expired one is left to `_forget_expired`."""
    if not code or len(code) > 64:
        return None
    kv = await store.get(_code_key(code))
    if kv is None:
        return None
    try:
        record = json.loads(kv.value)
        if not isinstance(record, dict) or float(record["expires"]) < time.time():
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return kv, record


async def peek_code(store: Store, code: str) -> dict[str, str | None] | None:
    """Whom a code would sign in as (`make_code`'s `who`, and its token's digest for `owns`), the
    code left good; None if it is not (used, expired, never made)."""
    found = await _live_code(store, code)
    if found is None:
        return None
    record = found[1]
    who = record.get("who")
    digest = None if record.get("owner") is None else str(record["owner"])
    if not isinstance(who, dict):
        return {"digest": digest}  # made before links said whose they are
    return {
        "digest": digest,
        **{k: None if who.get(k) is None else str(who[k]) for k in ("name", "role", "app")},
    }


def owns(session: Session, digest: str | None) -> bool:
    """Whether a code (`peek_code`'s "digest") would sign in with this session's own token: a name is
    the admin's choice and need not be unique (two `deploy` tokens are both named "deploy")."""
    return digest is not None and hmac.compare_digest(_owner(session.token), digest)


async def redeem_code(store: Store, box: SecretBox, code: str) -> str | None:
    """The token a code was made for, the first time it is shown while good; None after."""
    found = await _live_code(store, code)
    if found is None:
        return None
    kv, record = found
    # Whoever deletes it first wins: a second redeemer (another tab, another server) finds it gone.
    try:
        if not await store.delete(kv.key, if_revision=kv.mod_revision):
            return None
    except Conflict:
        return None
    try:
        return box.decrypt(record["token"])
    except ValueError:
        return None


async def _forget_expired(store: Store) -> list[str]:
    """Expired codes deleted; the owner (token digest) of each code still good."""
    items, _ = await store.list(CODE_PREFIX)
    now = time.time()
    live: list[str] = []
    for kv in items:
        record = json.loads(kv.value)
        if record.get("expires", 0) < now:
            with contextlib.suppress(Conflict):  # redeemed meanwhile
                await store.delete(kv.key, if_revision=kv.mod_revision)
        else:
            live.append(str(record.get("owner", "")))
    return live
