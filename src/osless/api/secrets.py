"""The platform's secret key: secrets encrypted at rest, and the tokens scoped to one app.

The key lives apart from the database: a file in the data dir by default (mode 600), or a file or
an environment variable the operator names. Without it, the secrets in `state.db` are noise.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from osless import tokens

__all__ = ["SecretBox", "load_key"]

KEY_ENV = "OSLESS_SECRET_KEY"
APP_TOKEN_PREFIX = tokens.APP
SCOPED_PREFIXES = tokens.SCOPED
PEER_SCOPE = "platform"  # the `app` part of a peer token: it is for no app


def load_key(data_dir: Path, key_file: Path | None = None) -> bytes:
    """The Fernet key: from $OSLESS_SECRET_KEY, else `key_file`, else `<data_dir>/secret.key` (made once)."""
    if env := os.environ.get(KEY_ENV):
        return _check(env.encode(), f"${KEY_ENV}")
    path = key_file or data_dir / "secret.key"
    if path.exists():
        return _check(path.read_bytes().strip(), str(path))
    if key_file is not None:
        raise SystemExit(f"the secret key file {key_file} does not exist")
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def _check(key: bytes, where: str) -> bytes:
    try:
        Fernet(key)
    except ValueError as e:
        raise SystemExit(f"the secret key in {where} is not a Fernet key (32 url-safe base64 bytes)") from e
    return key


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)
        # A separate key for app tokens, so that neither use weakens the other.
        self._token_key = hashlib.sha256(b"osless app token\0" + base64.urlsafe_b64decode(key)).digest()
        self._scoped_key = hashlib.sha256(b"osless scoped token\0" + base64.urlsafe_b64decode(key)).digest()

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as e:
            raise ValueError("a secret cannot be decrypted with this key (was the key changed?)") from e

    def app_token(self, app: str) -> str:
        """The credential an app's instances get: it opens that app's config and endpoints, no more."""
        mac = hmac.new(self._token_key, app.encode(), hashlib.sha256).hexdigest()[:40]
        return f"{APP_TOKEN_PREFIX}{app}_{mac}"

    def app_of(self, token: str) -> str | None:
        """The app an app token belongs to, or None if it is not a valid one."""
        if not token.startswith(APP_TOKEN_PREFIX):
            return None
        app, _, _ = token[len(APP_TOKEN_PREFIX) :].rpartition("_")
        return app if app and hmac.compare_digest(self.app_token(app), token) else None

    def scoped_token(self, role: str, app: str, ttl_s: float, holder: str = "") -> str:
        """A credential the API makes for one of its own requests to another part, instead of passing
        on its caller's token (which that part has no business holding): `reader` (an app's logs, shown
        to the node `holder`), `volumes` (the files of an app's volumes, shown to the node `holder`),
        `runner` (a command of an app run on the node `holder`: `api.runs`), `debugger` (an instance's
        stack or profile taken by the node `holder`: api/routes/debug.py),
        `invoker` (an app's functions, shown to a gateway) or `peer` (images,
        layers and sources, shown by server `holder` to another server: `peer_token`). Limited to `app`,
        good for `ttl_s`; derived, never stored (servers sharing a store share the key)."""
        expires = int(time.time() + ttl_s)
        return (
            f"{SCOPED_PREFIXES[role]}{app}_{holder}_{expires}_{self._scoped_mac(role, app, holder, expires)}"
        )

    def peer_token(self, server: str, ttl_s: float) -> str:
        """What a server shows another for images, layers and sources it lacks: only servers hold the
        key it is derived from (nodes, gateways and builders never see it)."""
        return self.scoped_token("peer", PEER_SCOPE, ttl_s, server)

    def scoped_of(self, token: str) -> tuple[str, str, str, float] | None:
        """(role, app, holder, expiry) of a scoped token still good, or None."""
        role = next((r for r, prefix in SCOPED_PREFIXES.items() if token.startswith(prefix)), None)
        if role is None:
            return None
        parts = token[len(SCOPED_PREFIXES[role]) :].split("_")
        # ASCII digits only: isdigit() also holds for '²', which int() refuses (a stranger's 500).
        expiry = parts[2] if len(parts) == 4 else ""
        if not parts[0] or not (expiry.isascii() and expiry.isdigit()) or int(expiry) < time.time():
            return None
        app, holder, expires, mac = parts
        if not hmac.compare_digest(self._scoped_mac(role, app, holder, int(expires)), mac):
            return None
        return role, app, holder, float(expires)

    def _scoped_mac(self, role: str, app: str, holder: str, expires: int) -> str:
        message = f"{role}\0{app}\0{holder}\0{expires}".encode()
        return hmac.new(self._scoped_key, message, hashlib.sha256).hexdigest()[:40]
