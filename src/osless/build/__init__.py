"""Building images: source archives (`source`), the image store (`images`) and the builder (`builder`).

The builder's helpers: `appname` (the app's name, read before anything runs), `requirements` (what
uv may be asked for), `process` (one step as a subprocess). `egress` (the build's way out, to the
package index only) is imported by the server alone: it needs the node's egress proxy.
"""

from __future__ import annotations

from osless.build.builder import (
    BUILD_NPROC,
    MAX_SOURCE_BYTES,
    MAX_SOURCE_FILES,
    Builder,
    BuildError,
    BuildResult,
)
from osless.build.images import (
    MAX_MANIFEST_BYTES,
    Collected,
    ImageNotFoundError,
    ImageStore,
    ManifestTooLarge,
    canonical_json,
    sha256_hex,
)
from osless.build.process import stop_all_builds
from osless.build.source import SourceError, pack, unpack

__all__ = [
    "BUILD_NPROC",
    "MAX_MANIFEST_BYTES",
    "MAX_SOURCE_BYTES",
    "MAX_SOURCE_FILES",
    "BuildError",
    "BuildResult",
    "Builder",
    "Collected",
    "ImageNotFoundError",
    "ImageStore",
    "ManifestTooLarge",
    "SourceError",
    "canonical_json",
    "pack",
    "sha256_hex",
    "stop_all_builds",
    "unpack",
]
