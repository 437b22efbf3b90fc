"""Building images: source archives (`source`), the image store (`images`) and the builder (`builder`)."""

from __future__ import annotations

from osless.build.builder import (
    MAX_SOURCE_BYTES,
    MAX_SOURCE_FILES,
    Builder,
    BuildError,
    BuildResult,
    stop_all_builds,
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
from osless.build.source import SourceError, pack, unpack

__all__ = [
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
