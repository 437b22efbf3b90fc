"""Where the CLI finds the platform: credentials saved by `osless up`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osless.cli.output import fail
from osless.errors import ApiError

if TYPE_CHECKING:
    from osless.client import Api

__all__ = ["api_and_token", "call", "client", "credentials_path", "load_credentials"]


def credentials_path() -> Path:
    base = os.environ.get("OSLESS_CONFIG_DIR") or os.path.join(
        os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "osless"
    )
    return Path(base) / "credentials.json"


def load_credentials() -> dict[str, Any]:
    try:
        data = json.loads(credentials_path().read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def api_and_token() -> tuple[str, str]:
    """The API's URL and the token: $OSLESS_API and $OSLESS_TOKEN, else what `osless up` saved."""
    api, token = os.environ.get("OSLESS_API"), os.environ.get("OSLESS_TOKEN")
    if not (api and token):
        saved = load_credentials()
        api, token = api or saved.get("api"), token or saved.get("token")
    if not (api and token):
        fail(
            "no credentials: start the platform with `osless up`, or set OSLESS_API and OSLESS_TOKEN",
            "no_credentials",
        )
    return str(api), str(token)


def client() -> Api:
    """The API client, with `api_and_token()`."""
    from osless.client.sync import Api

    return Api(*api_and_token())


def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """`fn(...)`, with an API error turned into one line and exit code 1."""
    try:
        return fn(*args, **kw)
    except ApiError as e:
        fail(e.message, e.code)
