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

__all__ = ["SecretBox", "load_key"]

KEY_ENV = "OSLESS_SECRET_KEY"
APP_TOKEN_PREFIX = "osla_"
READER_TOKEN_PREFIX = "oslr_"


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
        self._reader_key = hashlib.sha256(b"osless log reader\0" + base64.urlsafe_b64decode(key)).digest()

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

    def reader_token(self, app: str, ttl_s: float) -> str:
        """What the API shows a node when it asks for an app's logs, instead of its caller's token: it
        reads that app's logs and nothing else, for `ttl_s`. Derived, never stored (servers sharing a
        store share the key, so any of them vouches for it)."""
        expires = int(time.time() + ttl_s)
        return f"{READER_TOKEN_PREFIX}{app}_{expires}_{self._reader_mac(app, expires)}"

    def reader_of(self, token: str) -> tuple[str, float] | None:
        """(app, expiry) of a reader token still good, or None."""
        if not token.startswith(READER_TOKEN_PREFIX):
            return None
        app, _, rest = token[len(READER_TOKEN_PREFIX) :].rpartition("_")
        app, _, expires = app.rpartition("_")
        if not app or not expires.isdigit() or int(expires) < time.time():
            return None
        ok = hmac.compare_digest(self._reader_mac(app, int(expires)), rest)
        return (app, float(expires)) if ok else None

    def _reader_mac(self, app: str, expires: int) -> str:
        return hmac.new(self._reader_key, f"{app}\0{expires}".encode(), hashlib.sha256).hexdigest()[:40]
