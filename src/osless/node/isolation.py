"""What a release's sandbox is made of on this node: its uid, folders, volumes and egress socket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from osless.contracts import ImageManifest
from osless.images.runtime import hidden_site_packages
from osless.runtime.sandbox import SandboxSpec

__all__ = ["BUILD_FSIZE_MB", "build_spec", "owned_dir", "sandbox_spec"]

# Wheels and their archives in uv's cache outgrow an instance's 1 GB file size limit (CUDA builds of
# torch are past 2 GB).
BUILD_FSIZE_MB = 16 * 1024


def owned_dir(path: Path, uid: int) -> Path:
    """`path`, made if missing, owned by `uid` alone (mode 700)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(0o700)
    return path


def sandbox_spec(
    manifest: ImageManifest,
    *,
    uid: int,
    layers: list[Path],
    runtime: Path,
    data_dir: Path,
    run_dir: Path,
    volumes: dict[str, str],
    egress_socket: Path | None,
) -> SandboxSpec:
    """An app's sandbox; `uid` is the app's own, allocated by the API (the instance record has it).
    `layers`: the image's layers in the node's image cache, bound read-only at their own paths, and
    `runtime` the node's runtime layer (`images.runtime`): the only packages besides the app's.
    `volumes` maps each path inside to the host folder the node made ready for it (`node.volumes`).

    Nothing the node trusts is writable in it: the instances' sockets are bound by the node in a
    folder the sandbox never sees, and only the app's volumes are writable."""
    root = run_dir / "sandbox-root"
    root.mkdir(parents=True, exist_ok=True)
    return SandboxSpec(
        uid=uid,
        hostname=manifest.app,
        root=str(root),
        readonly=[str(runtime), *(str(p) for p in layers)],
        volumes=volumes,
        hide=[str(data_dir), str(run_dir), *hidden_site_packages()],
        proxy_socket=str(egress_socket) if egress_socket else None,
    )


def build_spec(
    *,
    uid: int,
    readonly: list[Path],
    volumes: dict[str, Path],
    egress_socket: Path | None,
    data_dir: Path,
    run_dir: Path,
) -> dict[str, Any]:
    """The sandbox a build step runs in, as the app's own `uid`: `readonly` bound at their own paths
    (its layers and the runtime layer), `volumes` (inside path -> host folder: the step's scratch,
    cache and output) writable, and, to resolve and install, the build's egress socket to the package
    index."""
    root = run_dir / "sandbox-root"
    root.mkdir(parents=True, exist_ok=True)
    return SandboxSpec(
        uid=uid,
        hostname="build",
        root=str(root),
        readonly=[str(p) for p in readonly],
        volumes={inside: str(host) for inside, host in volumes.items()},
        hide=[str(data_dir), str(run_dir), *hidden_site_packages()],
        proxy_socket=str(egress_socket) if egress_socket else None,
        fsize_mb=BUILD_FSIZE_MB,
    ).to_json()
