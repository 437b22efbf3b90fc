"""The node's image cache: manifests and layers pulled from the API by digest, checked, kept a while.

Layout under `root` (the node's own, never the API's image store): `manifests/<image>.json` (the
exact bytes, whose sha256 is the image digest), `layers/<sha256>/` (a layer archive unpacked and
sealed read-only, named by the archive's sha256) and `tmp/` (pulls under way, cleaned at start).

The chain of trust: the instance record names the image digest; sha256(manifest bytes) must be it;
the manifest names each layer archive's sha256 and size; the bytes pulled must match both, or the
layer is refused and nothing of it is kept. Images of the previous release carry no archive digests
in their manifest: their layers' are asked of the API (`GET /v1/images/{digest}/layers`), so for
them the node checks the bytes against what the API recorded when it first archived each layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from osless.client import ApiError, AsyncApi
from osless.contracts import ImageArchives, ImageManifest, manifest_problem
from osless.images import MAX_MANIFEST_BYTES, fsync_dir, remove_tree, seal_contents, sealed_mode, write_file

__all__ = ["LAYER_GRACE_S", "ImageError", "LayerRefused", "NodeImages"]

log = logging.getLogger("osless.node.images")

LAYER_GRACE_S = 3600.0  # unused this long on the node: removed (a rollback within it starts at once)
_HEX = re.compile(r"[0-9a-f]{64}")
_DATA_FILTER = getattr(tarfile, "data_filter", None)  # 3.11.4+: a node refuses layers without it
_CHUNK = 1 << 20


class ImageError(Exception):
    """An image or one of its layers could not be had; the message says which and why."""


class LayerRefused(ImageError):
    """What the API sent is not what the manifest (or the image digest) names: refused."""


class NodeImages:
    """Pulls, checks and keeps the images of the instances placed on this node.

    `report(app, line)` writes a line in the app's own logs (a refused layer is the app's business).
    """

    def __init__(
        self,
        api: AsyncApi,
        root: Path,
        *,
        report: Callable[[str, str], None] = lambda app, line: None,
        grace_s: float = LAYER_GRACE_S,
    ) -> None:
        self.api = api
        self.root = Path(root)
        self.manifests_dir = self.root / "manifests"
        self.layers_dir = self.root / "layers"
        self.tmp_dir = self.root / "tmp"
        for d in (self.manifests_dir, self.layers_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for entry in self.tmp_dir.iterdir():  # pulls a crash cut off
            remove_tree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self.report = report
        self.grace_s = grace_s
        self._manifests: dict[str, ImageManifest] = {}
        self._pulls: dict[str, asyncio.Task[Path]] = {}  # sha256 -> the one pull of that layer
        self._manifest_pulls: dict[str, asyncio.Task[ImageManifest]] = {}
        self._last_used: dict[str, float] = {}  # image or layer sha256 -> when last in use here
        self._image_layers: dict[str, set[str]] = {}  # image -> the sha256 of its layers' archives

    # -- manifests -------------------------------------------------------------------------------

    def cached_manifest(self, image: str) -> ImageManifest:
        """The manifest of `image` if this node has pulled it (KeyError if not)."""
        found = self._manifests.get(image)
        if found is None:
            try:
                data = (self.manifests_dir / f"{_check(image)}.json").read_bytes()
            except FileNotFoundError:
                raise KeyError(f"image {image[:12]} is not on this node yet") from None
            found = self._manifests[image] = _parse(data, image)
        return found

    async def manifest(self, image: str) -> ImageManifest:
        """The manifest of `image`: from the cache, or pulled and checked (one pull for all asking)."""
        with contextlib.suppress(KeyError):
            return self.cached_manifest(image)
        task = self._manifest_pulls.get(image)
        if task is None:
            task = asyncio.create_task(self._pull_manifest(image))
            self._manifest_pulls[image] = task
            task.add_done_callback(lambda _: self._manifest_pulls.pop(image, None))
        return await asyncio.shield(task)

    async def _pull_manifest(self, image: str) -> ImageManifest:
        _check(image)
        data = bytearray()
        try:
            async for chunk in self.api.download(f"/v1/images/{image}"):
                data += chunk
                if len(data) > MAX_MANIFEST_BYTES:
                    raise LayerRefused(
                        f"the manifest of image {image} is past {MAX_MANIFEST_BYTES // 1024} KiB; refused"
                    )
        except ApiError as e:
            raise ImageError(f"image {image} could not be pulled: {e.message}") from e
        got = hashlib.sha256(data).hexdigest()
        if got != image:
            raise LayerRefused(f"the manifest of image {image} is corrupt: its sha256 is {got}; refused")
        manifest = _parse(bytes(data), image)
        write_file(self.manifests_dir / f"{image}.json", bytes(data), self.tmp_dir)
        self._manifests[image] = manifest
        return manifest

    # -- layers ----------------------------------------------------------------------------------

    async def layers(self, image: str) -> dict[str, Path]:
        """Each layer of `image` (`code`, `deps`) as a sealed folder on this node, pulled if missing.

        Raises LayerRefused (and writes why in the app's logs) when the API's bytes do not match."""
        manifest = await self.manifest(image)
        archives = await self._archives(image, manifest)
        self._image_layers[image] = {sha for sha, _ in archives.values()}
        found = await asyncio.gather(
            *(self._layer(image, manifest.app, a) for a in archives.values()),
            return_exceptions=True,
        )
        for result in found:
            if isinstance(result, BaseException):
                raise result
        return {name: path for name, path in zip(archives, found, strict=True) if isinstance(path, Path)}

    async def _archives(self, image: str, manifest: ImageManifest) -> dict[str, tuple[str, int]]:
        table = manifest.layer_archives
        if table is None:  # an image of the previous release: its archives are the API's word
            try:
                listed = (await self.api.get(f"/v1/images/{image}/layers"))["layers"]
            except (ApiError, KeyError, TypeError) as e:
                raise ImageError(f"the layers of image {image} could not be listed: {e}") from e
            try:
                table = ImageArchives.model_validate(listed)
            except ValidationError as e:
                raise LayerRefused(
                    f"the layer archives of image {image} are refused: {manifest_problem(e)}"
                ) from e
        return {"code": (table.code.sha256, table.code.size), "deps": (table.deps.sha256, table.deps.size)}

    def layer_path(self, sha256: str) -> Path:
        return self.layers_dir / _check(sha256)

    async def _layer(self, image: str, app: str, archive: tuple[str, int]) -> Path:
        sha256, size = archive
        path = self.layer_path(sha256)
        self._last_used[sha256] = time.monotonic()
        if path.is_dir():
            return path
        task = self._pulls.get(sha256)
        if task is None:
            task = asyncio.create_task(self._pull_layer(image, sha256, size))
            self._pulls[sha256] = task
            task.add_done_callback(lambda _: self._pulls.pop(sha256, None))
        try:
            return await asyncio.shield(task)
        except LayerRefused as e:
            self.report(app, str(e))
            raise

    async def _pull_layer(self, image: str, sha256: str, size: int) -> Path:
        started = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(prefix=f"layer-{sha256[:12]}-", suffix=".tar", dir=self.tmp_dir)
        try:
            digest = hashlib.sha256()
            got = 0
            with os.fdopen(fd, "wb") as f:
                try:
                    async for chunk in self.api.download(f"/v1/layers/{sha256}"):
                        got += len(chunk)
                        if got > size:  # bounded by the manifest before it is written
                            raise LayerRefused(
                                f"layer {sha256} of image {image} is corrupt: longer than the {size} bytes "
                                "its manifest says; refused"
                            )
                        digest.update(chunk)
                        f.write(chunk)
                except ApiError as e:
                    raise ImageError(
                        f"layer {sha256} of image {image} could not be pulled: {e.message}"
                    ) from e
            actual = digest.hexdigest()
            if actual != sha256 or got != size:
                raise LayerRefused(
                    f"layer {sha256} of image {image} is corrupt: "
                    f"expected sha256 {sha256}, got {actual}; refused"
                )
            path = await asyncio.to_thread(self._unpack, Path(tmp_name), sha256)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        log.info("pulled layer %s (%d bytes) in %.2f s", sha256[:12], size, time.monotonic() - started)
        return path

    def _unpack(self, archive: Path, sha256: str) -> Path:
        """Extract a checked archive into a scratch folder, seal it, and rename it into place."""
        tmp = Path(tempfile.mkdtemp(prefix=f"layer-{sha256[:12]}-", dir=self.tmp_dir))
        try:
            try:
                with tarfile.open(archive, mode="r:") as tar:
                    tar.extractall(tmp, filter=_OnlyInside())
            except (tarfile.TarError, OSError) as e:
                raise LayerRefused(f"layer {sha256} cannot be unpacked ({e}); refused") from e
            seal_contents(tmp)
            final = self.layer_path(sha256)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
                remove_tree(tmp)  # the same bytes, unpacked meanwhile
                return final
            fsync_dir(self.layers_dir)
            os.chmod(final, sealed_mode(os.lstat(final).st_mode))
            return final
        except BaseException:
            remove_tree(tmp)
            raise

    # -- collection ------------------------------------------------------------------------------

    async def collect(self, in_use: Collection[str]) -> tuple[int, int]:
        """Remove the manifests and layers no image in `in_use` (those of the instances and
        zygotes on this node) has needed for `grace_s`. Returns (manifests, layers) removed."""
        now = time.monotonic()
        keep = set(in_use) | set(self._pulls) | set(self._manifest_pulls)
        for image in in_use:
            keep |= self._image_layers.get(image, set())
        for name in keep:
            self._last_used[name] = now
        manifests = [(p.stem, p) for p in self.manifests_dir.glob("*.json")]
        layers = [(p.name, p) for p in self.layers_dir.iterdir()]
        removed = {"manifests": 0, "layers": 0}
        for kind, entries in (("manifests", manifests), ("layers", layers)):
            for name, path in entries:
                # Unused since this agent started, at least: a restart never removes anything at once.
                if name in keep or now - self._last_used.setdefault(name, now) < self.grace_s:
                    continue
                if kind == "manifests":
                    path.unlink(missing_ok=True)
                    self._manifests.pop(name, None)
                    self._image_layers.pop(name, None)
                else:
                    # Out of the way at once (a pull of it may start next), deleted off the loop.
                    gone = self.tmp_dir / f"collected-{name}"
                    os.chmod(path, 0o700)  # a folder moves only if writable (its `..` changes)
                    os.rename(path, gone)
                    await asyncio.to_thread(remove_tree, gone)
                self._last_used.pop(name, None)
                removed[kind] += 1
        if any(removed.values()):
            log.info("collected %(manifests)d manifests and %(layers)d layers of the image cache", removed)
        return removed["manifests"], removed["layers"]


class _OnlyInside:
    """The extraction filter of a layer: tarfile's `data` filter (no absolute or `..` paths, no link
    leading out, no devices, no set-id bits), regular files, folders and symbolic links only (what the
    image store archives), and an own check that needs no `realpath`: Python before 3.11.13 lets a
    chain of links longer than PATH_MAX past the `data` filter (CVE-2025-4517, -4138, -4330), and a
    member then written through it lands anywhere. So nothing is written at or under a link the
    archive made, and a link's target climbs (leading `..` only) no higher than its own folder's depth:
    each link then resolves inside the layer by its text alone. Called for each member in order."""

    def __init__(self) -> None:
        self.links: set[tuple[str, ...]] = set()
        self.seen: set[tuple[str, ...]] = set()

    def __call__(self, member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        if _DATA_FILTER is None:
            raise tarfile.FilterError("this Python has no tarfile.data_filter (3.11.4 or later has it)")
        parts = tuple(p for p in PurePosixPath(member.name).parts if p != ".")
        if member.name.startswith("/") or ".." in parts or not parts:
            raise tarfile.FilterError(f"{member.name[:200]!r} is not a path inside the layer")
        if any(parts[:k] in self.links for k in range(1, len(parts) + 1)):
            raise tarfile.FilterError(f"{member.name[:200]!r} would be written through a link of the layer")
        if parts in self.seen and not member.isdir():
            raise tarfile.FilterError(f"{member.name[:200]!r} is in the layer twice")
        checked: tarfile.TarInfo = _DATA_FILTER(member, dest)
        if not (checked.isreg() or checked.isdir() or checked.issym()):
            raise tarfile.FilterError(f"{member.name[:200]!r} is not a file, folder or symbolic link")
        if checked.issym():
            target = PurePosixPath(checked.linkname).parts
            up = next((k for k, p in enumerate(target) if p != ".."), len(target))  # leading `..`
            if checked.linkname.startswith("/") or ".." in target[up:] or up > len(parts) - 1:
                raise tarfile.FilterError(
                    f"link {member.name[:200]!r} -> {checked.linkname[:200]!r} may lead out of the layer"
                )
            self.links.add(parts)
        self.seen.add(parts)
        return checked


def _check(digest: str) -> str:
    # Digests become path components: anything but 64 hex digits could escape the cache.
    if not _HEX.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}: expected 64 lowercase hex digits")
    return digest


def _parse(data: bytes, image: str) -> ImageManifest:
    """The manifest's exact bytes (checked against the digest first) read into the contract: the app's
    own process printed part of it, so a wrong type or a size past the SDK's is refused, named."""
    try:
        return ImageManifest.model_validate_json(data)
    except ValidationError as e:
        raise LayerRefused(f"the manifest of image {image} is refused: {manifest_problem(e)}") from e
