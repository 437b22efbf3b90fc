"""Where the CLI finds the platform: credentials saved by `osless up`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["credentials_path", "load_credentials"]


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
