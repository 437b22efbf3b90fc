"""What a release's sandbox is made of on this node: its uid, folders, volumes and egress socket."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from osless.runtime.sandbox import SandboxSpec

__all__ = ["app_socket_dir", "app_uid", "build_spec", "sandbox_spec"]

UID_BASE, UID_RANGE = 100_000, 900_000


def app_uid(app: str) -> int:
    """The host uid that is root inside every sandbox of `app`: one user per app, none of the host's."""
    return UID_BASE + int(hashlib.sha256(app.encode()).hexdigest()[:12], 16) % UID_RANGE


def _owned_dir(path: Path, uid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(0o700)
    return path


def sandbox_spec(
    manifest: dict[str, Any], *, layers: Path, data_dir: Path, run_dir: Path, egress_socket: Path | None
) -> SandboxSpec:
    app = str(manifest["app"])
    uid = app_uid(app)
    volumes = {
        inside: str(_owned_dir(data_dir / "volumes" / app / name, uid))
        for inside, name in (manifest.get("volumes") or {}).items()
    }
    root = run_dir / "sandbox-root"
    root.mkdir(parents=True, exist_ok=True)
    return SandboxSpec(
        uid=uid,
        hostname=app,
        root=str(root),
        readonly=[str(layers / manifest["layers"]["code"]), str(layers / manifest["layers"]["deps"])],
        writable=[str(app_socket_dir(run_dir, app, uid))],
        volumes=volumes,
        hide=[str(data_dir), str(run_dir)],
        proxy_socket=str(egress_socket) if egress_socket else None,
    )


def build_spec(code: Path, deps: Path, *, data_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The sandbox an app's import runs in at build time: its two layers, no network, no volumes."""
    root = run_dir / "sandbox-root"
    root.mkdir(parents=True, exist_ok=True)
    return SandboxSpec(
        uid=app_uid("osless-build"),
        hostname="build",
        root=str(root),
        readonly=[str(code), str(deps)],
        hide=[str(data_dir), str(run_dir)],
    ).to_json()


def app_socket_dir(run_dir: Path, app: str, uid: int | None = None) -> Path:
    """The folder of an app's instance sockets: the one place its sandbox shares with the node."""
    # Named by uid, not by app name: a unix socket path must stay under 108 bytes.
    path = run_dir / "a" / str(app_uid(app))
    if uid is None:
        path.mkdir(parents=True, exist_ok=True)
        return path
    return _owned_dir(path, uid)
