"""Images: the content-addressed store of layers and manifests (`store`), what a build writes, the API
serves by digest and a node pulls and checks (`node.images`)."""

from __future__ import annotations

from osless.images.store import (
    MAX_MANIFEST_BYTES,
    Collected,
    ImageNotFoundError,
    ImageStore,
    LayerArchive,
    ManifestTooLarge,
    UidFolders,
    canonical_json,
    collect_uid_folders,
    fsync_dir,
    manifest_json,
    remove_tree,
    seal_contents,
    sealed_mode,
    sha256_hex,
    write_archive,
    write_file,
)

__all__ = [
    "MAX_MANIFEST_BYTES",
    "Collected",
    "ImageNotFoundError",
    "ImageStore",
    "LayerArchive",
    "ManifestTooLarge",
    "UidFolders",
    "canonical_json",
    "collect_uid_folders",
    "fsync_dir",
    "manifest_json",
    "remove_tree",
    "seal_contents",
    "sealed_mode",
    "sha256_hex",
    "write_archive",
    "write_file",
]
