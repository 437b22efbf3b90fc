"""What a deleted app leaves behind: its build caches are collected once nothing of it remains.

Finding A5 (weak): each app's uv cache (`data/cache/uv/<uid>`) and lock folder (`images/locks/<uid>`)
are keyed by a uid that is never used again once the app is deleted, and nothing removed them: every
delete and re-create of an app with dependencies added a whole new cache. (The uid claims themselves
are kept on purpose, never reused; the range is a billion wide.)
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.platform import Platform, copy_app

APPS = Path(__file__).resolve().parent.parent / "apps"


def _collect_everything(platform: Platform) -> dict[str, object]:
    retention = {
        "deploys_days": 0,
        "deploys_per_app": 1,
        "releases_per_app": 1,
        "instance_logs_days": 0,
        "grace_s": 0,
        "interval_s": 3600,
    }
    assert platform.http("PUT", "/v1/retention", json=retention).status_code == 200
    r = platform.http("POST", "/v1/retention/collect")
    assert r.status_code == 200, r.text
    collected: dict[str, object] = r.json()
    return collected


def test_a_deleted_apps_build_cache_is_collected(own_platform: Platform, tmp_path: Path) -> None:
    platform = own_platform
    platform.deploy(copy_app(APPS / "build_six", tmp_path / "six"), "--name", "cached")
    uid = platform.http("GET", "/v1/apps/cached").json()["uid"]
    # The builder process's: it removes those of apps gone after a pass (`GET /v1/builds/kept`).
    cache = platform.data_dir / "builder" / "cache" / "uv" / str(uid)
    locks = platform.data_dir / "builder" / "images" / "locks" / str(uid)
    assert cache.is_dir() and any(cache.iterdir()) and locks.is_dir()
    assert platform.http("DELETE", "/v1/apps/cached").status_code == 204
    time.sleep(1)
    print("collected:", _collect_everything(platform))
    platform.wait_for(
        lambda: not cache.exists() and not locks.exists(), timeout=30, what="the builder's sweep"
    )
    left = [str(p) for p in (cache, locks) if p.exists()]
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.exists() else 0
    assert not left, f"left for ever: {left} ({size} bytes of cache)"
