"""The content-addressed image store: read-only layer directories and JSON image manifests.

Layout under `root`: `layers/<hex>/`, `manifests/<hex>.json`, and `tmp/` where everything is
built before being renamed into place, so a digest never names something half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["ImageNotFoundError", "ImageStore", "canonical_json", "sha256_hex"]

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


def sha256_hex(data: bytes) -> str:
    """The lowercase hex sha256 of `data`: the digest format of layers and images."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The bytes an image digest is taken over: same content, same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class ImageNotFoundError(KeyError):
    """No image manifest with that digest in the store."""

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its argument, quotes and all.
        return str(self.args[0]) if self.args else "image not found"


class ImageStore:
    """Layers and manifests under `root`, created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.manifests_dir = self.root / "manifests"
        self.tmp_dir = self.root / "tmp"
        for d in (self.layers_dir, self.manifests_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def layer_path(self, digest: str) -> Path:
        return self.layers_dir / _check_digest(digest)

    def has_layer(self, digest: str) -> bool:
        return self.layer_path(digest).is_dir()

    def clean_tmp(self) -> None:
        """Remove what builds cut off by a crash left in the scratch folder; call before any build."""
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                _remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)

    def add_layer(self, digest: str, fill: Callable[[Path], None]) -> Path:
        """The layer `digest`, made by `fill(empty_dir)` unless it already exists.

        `fill` works in a scratch directory that is renamed into place only once it returned, so
        readers see the whole layer or none. If another build added the same layer meanwhile, the
        existing one is kept (equal digests mean equal content).
        """
        final = self.layer_path(digest)
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f"layer-{digest[:12]}-", dir=self.tmp_dir))
        try:
            fill(tmp)
            # Contents become ours, read-only and on disk before the rename, so what appears under the
            # digest is complete even after a power loss. The top directory stays writable until after the
            # rename: moving a directory needs write access to it (for its `..` entry).
            _seal_contents(tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
                    _remove_tree(tmp)
                    return final
                raise
            _fsync_dir(self.layers_dir)
            os.chmod(final, _sealed_mode(os.lstat(final).st_mode))
            return final
        except BaseException:
            _remove_tree(tmp)
            raise

    @contextlib.contextmanager
    def scratch(self, prefix: str) -> Iterator[Path]:
        """A folder of the scratch space for one build, removed afterwards (links not followed)."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        try:
            yield path
        finally:
            _remove_tree(path)

    def has_manifest(self, digest: str) -> bool:
        return self._manifest_path(digest).is_file()

    def put_manifest(self, manifest: dict[str, Any]) -> str:
        """Store `manifest` and return its digest: the sha256 of its canonical JSON."""
        data = canonical_json(manifest)
        digest = sha256_hex(data)
        final = self._manifest_path(digest)
        if final.is_file():
            return digest
        fd, tmp_name = tempfile.mkstemp(prefix=f"manifest-{digest[:12]}-", suffix=".json", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o444)
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(self.manifests_dir)
        return digest

    def get_manifest(self, digest: str) -> dict[str, Any]:
        path = self._manifest_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"no image sha256:{digest} in the image store at {self.root}") from None
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError(f"image manifest {path} is not a JSON object")
        return manifest

    def _manifest_path(self, digest: str) -> Path:
        return self.manifests_dir / f"{_check_digest(digest)}.json"


def _check_digest(digest: str) -> str:
    # Digests become path components: anything but 64 hex digits could escape the store.
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}: expected 64 lowercase hex digits")
    return digest


def _sealed_mode(mode: int) -> int:
    """Read-only for everyone, and readable by everyone: sandboxes read layers as an unprivileged uid."""
    if stat.S_ISDIR(mode) or mode & 0o111:
        return 0o555
    return 0o444


def _seal_contents(top: Path) -> None:
    """Take `top`'s contents over: ours (a sandboxed build filled them as the app's uid), read-only, on disk.

    Never follows a link the build left: each file and folder is opened with O_NOFOLLOW and changed
    through its descriptor, links are changed themselves, and anything else (fifos, sockets) goes.
    Owner first, then mode: the kernel clears set-id bits and file capabilities on a change of owner.
    """
    uid, gid = os.geteuid(), os.getegid()
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in (*filenames, *dirnames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                os.chown(path, uid, gid, follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                _take(path, stat.S_ISDIR(st.st_mode), uid, gid, seal=True)
            else:
                os.unlink(path)
    _take(str(top), True, uid, gid, seal=False)  # writable until renamed into place (see add_layer)


def _take(path: str, is_dir: bool, uid: int, gid: int, *, seal: bool) -> None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else os.O_NONBLOCK)
    fd = os.open(path, flags)
    try:
        os.fchown(fd, uid, gid)
        for acl in ("system.posix_acl_access", "system.posix_acl_default"):
            with contextlib.suppress(OSError):  # none set (ENODATA), or no ACLs here (ENOTSUP)
                os.removexattr(fd, acl)
        if seal:
            os.fchmod(fd, _sealed_mode(os.fstat(fd).st_mode))
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(top: Path) -> None:
    # Sealed directories must be writable again before their entries can be removed.
    with contextlib.suppress(OSError):
        for dirpath, dirnames, _ in os.walk(top):
            os.chmod(dirpath, 0o700)
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o700)
    shutil.rmtree(top, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
