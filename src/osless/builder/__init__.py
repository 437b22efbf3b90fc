"""The builder: a source archive (`source`) made into an image in the image store (`osless.images`).

Its helpers: `appname` (the app's name, read before anything runs), `requirements` (what uv may be
asked for), `process` (one step as a subprocess). `egress` (the build's way out, to the package
index only) is imported by the server alone: it needs the node's egress proxy.
"""

from __future__ import annotations

from osless.builder.builder import (
    BUILD_NPROC,
    MAX_SOURCE_BYTES,
    MAX_SOURCE_FILES,
    Builder,
    BuildError,
    BuildResult,
)
from osless.builder.process import stop_all_builds
from osless.builder.source import SourceError, pack, unpack

__all__ = [
    "BUILD_NPROC",
    "MAX_SOURCE_BYTES",
    "MAX_SOURCE_FILES",
    "BuildError",
    "BuildResult",
    "Builder",
    "SourceError",
    "pack",
    "stop_all_builds",
    "unpack",
]
