"""Volumes of a declared size: the app declares the size, and the count, itself.

Finding A6 (weak): the sizes that are "enforced" are the app's own choice, up to 1 TiB each, and
nothing bounds how many volumes an app declares (only the 256 KiB manifest does: thousands). So a
single app may write far more than the host's disk holds (ENOSPC comes from the host's disk, for
every app and for the platform's own `state.db`, before it comes from the volume), and each volume
costs a loop device, a mount and ~16 MB of real disk for the filesystem's metadata before the app
writes a byte. Hole 7 of issue 10 ("a volume takes as much as the host disk has") stays open for
any app that asks: as with egress, a limit the app writes itself protects nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.attack.helpers import write_app
from tests.platform import Platform

COUNT = 8
HOARDER = f"""\
import os

import osless

app = osless.App(
    "hoarder",
    volumes={{f"/v{{n}}": osless.Volume(f"v{{n}}", size_mb=1024 * 1024) for n in range({COUNT})}},
)


@app.function()
def room(event, ctx):
    return sum(os.statvfs(f"/v{{n}}").f_bavail * os.statvfs(f"/v{{n}}").f_frsize for n in range({COUNT}))
"""


def test_an_app_cannot_be_given_more_volume_room_than_the_host_has(
    platform: Platform, tmp_path: Path
) -> None:
    platform.cli("deploy", str(write_app(tmp_path / "hoarder", HOARDER)), "--detach")

    def refused() -> str | None:
        for instance in platform.instances("hoarder"):
            reason = (instance["status"].get("last_exit") or {}).get("reason") or ""
            if "volumes are promised" in reason:
                return str(reason)
        return None

    reason = platform.wait_for(refused, timeout=60, what="the hoarder's volumes to be refused")
    assert "declare a smaller size_mb" in reason
    disk = os.statvfs(platform.data_dir)
    images = list((platform.data_dir / "volumes" / "hoarder").glob("*.img"))
    promised = sum(p.stat().st_size for p in images)
    assert promised <= disk.f_blocks * disk.f_frsize, f"{len(images)} images promise {promised >> 30} GiB"
    assert platform.http("DELETE", "/v1/apps/hoarder").status_code == 204
