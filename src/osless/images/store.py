"""The content-addressed image store: read-only layer directories, their archives and JSON manifests.

Layout under `root`: `layers/<id>/`, `archives/<sha256>.tar` (each layer as a deterministic tar:
what nodes pull and check), `archived/<id>.json` (a layer's archive: its sha256 and size),
`manifests/<hex>.json`, `locks/<uid>/<hex>.txt` (the builder's cache of resolved requirements), and
`tmp/` where everything is built before being renamed into place, so a digest never names something
half-written. `collect` removes what nothing keeps; `collect_uid_folders` the per-app folders (lock
folders, a builder's uv caches) of apps gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from osless.contracts import ImageManifest

__all__ = [
    "MAX_MANIFEST_BYTES",
    "Collected",
    "ImageNotFoundError",
    "ImageStore",
    "LayerArchive",
    "ManifestTooLarge",
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

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
# A release record carries its manifest, and store values stop at 1 MiB: well below that.
MAX_MANIFEST_BYTES = 256 * 1024


def sha256_hex(data: bytes) -> str:
    """The lowercase hex sha256 of `data`: the digest format of layers and images."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The bytes an image digest is taken over: same content, same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_json(manifest: ImageManifest) -> bytes:
    """A manifest's canonical bytes, its digest's input: the keys it was given, and only those."""
    return canonical_json(manifest.model_dump(mode="json"))


class ImageNotFoundError(KeyError):
    """No image manifest with that digest in the store."""

    def __str__(self) -> str:
        # KeyError's own str() is the repr of its argument, quotes and all.
        return str(self.args[0]) if self.args else "image not found"


class ManifestTooLarge(ValueError):
    """An image manifest past MAX_MANIFEST_BYTES; the message names its largest parts."""


@dataclass(frozen=True)
class LayerArchive:
    """A layer as a node pulls it: the sha256 and size of its deterministic tar (`write_archive`)."""

    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Collected:
    """What one `collect` removed."""

    manifests: int = 0
    layers: int = 0
    locks: int = 0
    archives: int = 0
    bytes_freed: int = 0
    stopped: bool = False  # a build started: the rest waits for the next collection


class ImageStore:
    """Layers and manifests under `root`, created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layers_dir = self.root / "layers"
        self.manifests_dir = self.root / "manifests"
        self.locks_dir = self.root / "locks"
        self.archives_dir = self.root / "archives"
        self.archived_dir = self.root / "archived"
        self.tmp_dir = self.root / "tmp"
        dirs = (self.layers_dir, self.manifests_dir, self.locks_dir, self.archives_dir, self.archived_dir)
        for d in (*dirs, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Held while a digest is looked up or placed, and while `collect` removes one: a build
        # finds a layer whole, or not at all and makes it again.
        self._lock = threading.Lock()
        self._archiving = threading.Lock()  # one archive of a legacy layer made at a time

    def layer_path(self, digest: str) -> Path:
        return self.layers_dir / _check_digest(digest)

    def has_layer(self, digest: str) -> bool:
        with self._lock:
            return self.layer_path(digest).is_dir()

    def clean_tmp(self) -> None:
        """Remove what builds cut off by a crash left in the scratch folder; call before any build."""
        for entry in self.tmp_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)

    def add_layer(self, digest: str, fill: Callable[[Path], None]) -> Path:
        """The layer `digest`, made by `fill(empty_dir)` unless it already exists.

        `fill` works in a scratch directory that is renamed into place only once it returned, so
        readers see the whole layer or none. If another build added the same layer meanwhile, the
        existing one is kept (equal digests mean equal content).
        """
        final = self.layer_path(digest)
        if self.has_layer(digest):
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f"layer-{digest[:12]}-", dir=self.tmp_dir))
        try:
            fill(tmp)
            # Contents become ours, read-only and on disk before the rename, so what appears under the
            # digest is complete even after a power loss. The top directory stays writable until after the
            # rename: moving a directory needs write access to it (for its `..` entry).
            seal_contents(tmp)
            # Archived before the layer appears: every layer made here has its archive.
            self._archive(digest, tmp)
            try:
                with self._lock:
                    os.rename(tmp, final)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.is_dir():
                    remove_tree(tmp)
                    return final
                raise
            fsync_dir(self.layers_dir)
            os.chmod(final, sealed_mode(os.lstat(final).st_mode))
            return final
        except BaseException:
            remove_tree(tmp)
            raise

    def layer_archive(self, layer: str) -> LayerArchive:
        """The archive of layer `layer` (an id of `layers/`), made now for a layer of the previous
        release, which had none. Raises FileNotFoundError when there is no such layer."""
        found = self._archived(layer)
        if found is not None:
            return found
        with self._archiving:
            found = self._archived(layer)
            if found is not None:
                return found
            path = self.layer_path(layer)
            if not path.is_dir():
                raise FileNotFoundError(f"no layer {layer} in the image store at {self.root}")
            return self._archive(layer, path)

    def archive_path(self, sha256: str) -> Path:
        return self.archives_dir / f"{_check_digest(sha256)}.tar"

    def _archived(self, layer: str) -> LayerArchive | None:
        try:
            record = json.loads((self.archived_dir / f"{_check_digest(layer)}.json").read_bytes())
        except FileNotFoundError:
            return None
        found = LayerArchive(sha256=_check_digest(record["sha256"]), size=int(record["size"]))
        # An archive collected meanwhile (its layer was, too, and made again): made again as well.
        return found if self.archive_path(found.sha256).is_file() else None

    def _archive(self, layer: str, source: Path) -> LayerArchive:
        """Write `source`'s archive into `archives/` and record it as layer `layer`'s."""
        fd, tmp_name = tempfile.mkstemp(prefix=f"archive-{layer[:12]}-", suffix=".tar", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                found = write_archive(source, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o400)
            # Equal sha256, equal bytes: one already there (another layer's, same content) is kept.
            os.replace(tmp_name, self.archive_path(found.sha256))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        fsync_dir(self.archives_dir)
        write_file(self.archived_dir / f"{layer}.json", canonical_json(found.to_json()), self.tmp_dir)
        return found

    @contextlib.contextmanager
    def scratch(self, prefix: str) -> Iterator[Path]:
        """A folder of the scratch space for one build, removed afterwards (links not followed)."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp_dir))
        try:
            yield path
        finally:
            remove_tree(path)

    def has_manifest(self, digest: str) -> bool:
        # No lock: a manifest appears and goes by one rename, so it is either there or not.
        return self._manifest_path(digest).is_file()

    def put_manifest(self, manifest: ImageManifest) -> str:
        """Store `manifest` and return its digest: the sha256 of its canonical JSON (`manifest_json`).

        Raises ManifestTooLarge past MAX_MANIFEST_BYTES, naming what takes the room.
        """
        data = manifest_json(manifest)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestTooLarge(_too_large(manifest.model_dump(mode="json"), len(data)))
        digest = sha256_hex(data)
        final = self._manifest_path(digest)
        if self.has_manifest(digest):
            return digest
        fd, tmp_name = tempfile.mkstemp(prefix=f"manifest-{digest[:12]}-", suffix=".json", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o400)  # read-only; for the platform alone, like everything in the data dir
            with self._lock:
                os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        fsync_dir(self.manifests_dir)
        return digest

    def manifest_bytes(self, digest: str) -> bytes:
        """The manifest's exact bytes, the ones its digest is the sha256 of."""
        try:
            return self._manifest_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageNotFoundError(f"no image sha256:{digest} in the image store at {self.root}") from None

    def get_manifest(self, digest: str) -> ImageManifest:
        """The manifest read into its contract (pydantic's ValidationError, a ValueError, if not one)."""
        return ImageManifest.model_validate_json(self.manifest_bytes(digest))

    def _names(self, digest: str) -> tuple[set[str], set[str]]:
        """The layers and the archives (sha256) manifest `digest` names, read loosely, not into the
        contract: a manifest this code could not run still keeps what it names (a sweep never takes
        "unreadable" for "names nothing"). Nothing for a manifest not here."""
        try:
            raw = json.loads(self.manifest_bytes(digest))
        except (ImageNotFoundError, ValueError):
            return set(), set()
        layers: set[str] = set()
        archives: set[str] = set()
        with contextlib.suppress(AttributeError, TypeError):
            layers.update(str(d) for d in raw.get("layers").values())
        with contextlib.suppress(AttributeError, TypeError, KeyError):
            archives.update(str(a["sha256"]) for a in (raw.get("layer_archives") or {}).values())
        return layers, archives

    def has_image(self, digest: str) -> bool:
        """Whether manifest `digest` is here with every layer archive it names (a copy may lack one
        the collector took meanwhile)."""
        if not self.has_manifest(digest):
            return False
        return all(self.archive_path(sha).is_file() for sha in self._names(digest)[1])

    def touch_archive(self, sha256: str) -> bool:
        """Whether archive `sha256` is here, made young again if so: one a copy relies on waits out
        the collector's grace from now (under the lock, so not between a sweep's check and removal)."""
        with self._lock:
            try:
                os.utime(self.archive_path(sha256))
            except FileNotFoundError:
                return False
            return True

    def _manifest_path(self, digest: str) -> Path:
        return self.manifests_dir / f"{_check_digest(digest)}.json"

    def collect(
        self,
        *,
        keep_images: Collection[str],
        keep_locks: Collection[str],
        grace_s: float,
        busy: Callable[[], bool] = lambda: False,
    ) -> Collected:
        """Remove the manifests not in `keep_images`, the layers none of the kept manifests names
        (and their archives, but those another kept layer shares), and the lock files whose sha256
        is not in `keep_locks`: only those older than `grace_s`.

        Stops as soon as `busy()` (a build is running): a build may be about to use what is left.
        """
        # The manifests there before the kept ones are read: one that lands later (a peer's copy, an
        # upload) during the sweep keeps what it names all the same (`new_refs`).
        present = {p.name for p in self.manifests_dir.glob("*.json")}
        keep_layers: set[str] = set()
        kept_archives: set[str] = set()  # named by a kept manifest itself, whatever the records say
        for image in keep_images:
            layers, archives = self._names(image)
            keep_layers.update(layers)
            kept_archives.update(archives)
        old = time.time() - grace_s
        counts = {"manifests": 0, "layers": 0, "locks": 0, "archives": 0, "archived": 0, "bytes_freed": 0}

        def new_refs() -> tuple[set[str], set[str]]:
            """The layers and archives the manifests that landed since the pass began name (called
            under the lock, which a manifest lands under: one landing later is seen by the next)."""
            layers: set[str] = set()
            archives: set[str] = set()
            for path in self.manifests_dir.glob("*.json"):
                if path.name not in present:
                    found = self._names(path.stem)
                    layers.update(found[0])
                    archives.update(found[1])
            return layers, archives

        def remove(path: Path, kind: str) -> bool:
            with self._lock:  # checked under the lock: a build registers before it looks anything up
                if busy():
                    return False
                if kind in ("archives", "archived") and path.stem in new_refs()[kind == "archives"]:
                    return True
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    return True
                if max(st.st_mtime, st.st_ctime) > old:
                    return True
                # Only the rename under the lock (lookups wait on it, some on the API's loop); a
                # layer of gigabytes is sized and deleted after, out of everyone's way.
                gone = self.tmp_dir / f"collected-{kind}-{path.name}-{secrets.token_hex(4)}"
                os.replace(path, gone)
            if stat.S_ISDIR(st.st_mode):
                counts["bytes_freed"] += _tree_bytes(gone)
                remove_tree(gone)
            else:
                counts["bytes_freed"] += st.st_size
                gone.unlink(missing_ok=True)
            counts[kind] += 1
            return True

        gone_layers: set[str] = set()

        def sweep() -> bool:
            for path in self.manifests_dir.glob("*.json"):
                if path.stem not in keep_images and not remove(path, "manifests"):
                    return False
            for path in self.layers_dir.iterdir():
                if path.name not in keep_layers:
                    if not remove(path, "layers"):
                        return False
                    if not path.exists():
                        gone_layers.add(path.name)
            # A layer's archive goes with it (unless another layer has the same bytes).
            keep_archives = set(kept_archives)
            for path in self.archived_dir.glob("*.json"):
                if path.stem in keep_layers or (self.layers_dir / path.stem).exists():
                    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                        keep_archives.add(str(json.loads(path.read_bytes())["sha256"]))
                elif not remove(path, "archived"):
                    return False
                elif path.stem not in gone_layers and not path.exists():
                    # A layer the API holds as its archive alone (a builder uploaded it): counted once.
                    counts["layers"] += 1
            for path in self.archives_dir.glob("*.tar"):
                if path.stem not in keep_archives and not remove(path, "archives"):
                    return False
            for path in self.locks_dir.glob("**/*.txt"):  # locks/<uid>/<hex>.txt: one folder per app
                try:
                    digest = sha256_hex(path.read_bytes())
                except FileNotFoundError:
                    continue
                if digest not in keep_locks and not remove(path, "locks"):
                    return False
            return True

        done = sweep()
        counts.pop("archived")  # the records of the archives: counted with them
        return Collected(**counts, stopped=not done)


class UidFolders:
    """Which uids' folders (uv cache, locks) builds use now. A build holds its uid's (`using`) before
    it touches them; a sweep removes a uid's only while none holds them (`sweeping`), and a build
    starting meanwhile waits for the removal to end, then makes them anew: never removed mid-build."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._used: dict[str, int] = {}
        self._swept: set[str] = set()

    @contextlib.contextmanager
    def using(self, uid: int | None) -> Iterator[None]:
        if uid is None:
            yield
            return
        key = str(uid)
        with self._changed:
            self._changed.wait_for(lambda: key not in self._swept)
            self._used[key] = self._used.get(key, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                self._used[key] -= 1
                if not self._used[key]:
                    del self._used[key]

    @contextlib.contextmanager
    def sweeping(self, uid: str) -> Iterator[bool]:
        """True: the uid's folders are the sweep's until the block ends; False: a build uses them."""
        with self._changed:
            if uid in self._used:
                free = False
            else:
                free = True
                self._swept.add(uid)
        try:
            yield free
        finally:
            if free:
                with self._changed:
                    self._swept.discard(uid)
                    self._changed.notify_all()


def collect_uid_folders(
    parents: Iterable[Path],
    *,
    live: Collection[str],
    grace_s: float,
    busy: Callable[[], bool] = lambda: False,
    in_use: UidFolders | None = None,
) -> int:
    """Remove the per-app folders `<parent>/<uid>` (uv caches, lock folders: named by uid, so a new app
    of the same name has others) of the uids not in `live`, once older than `grace_s`; none once
    `busy()`, nor one a build holds in `in_use` (checked and removed under its lock). Bytes freed."""
    freed = 0
    old = time.time() - grace_s
    for parent in parents:
        try:
            folders = list(parent.iterdir())
        except FileNotFoundError:
            continue
        for folder in folders:
            if not folder.name.isdigit() or folder.name in live or folder.is_symlink():
                continue
            with contextlib.suppress(OSError), (in_use or UidFolders()).sweeping(folder.name) as free:
                if not free or folder.lstat().st_mtime >= old or busy():
                    continue
                # The app's build wrote in it: sized and removed without following a link it left.
                freed += _tree_bytes(folder)
                remove_tree(folder)
    return freed


def _too_large(manifest: dict[str, Any], size: int) -> str:
    parts = sorted(((len(canonical_json(v)), k) for k, v in manifest.items()), reverse=True)
    largest = ", ".join(f"{k} {n / 1024:.0f} KiB" for n, k in parts[:3])
    return (
        f"it would be {size / 1024:.0f} KiB, past the limit of {MAX_MANIFEST_BYTES // 1024} KiB "
        f"(largest parts: {largest})"
    )


def _tree_bytes(top: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(top):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _check_digest(digest: str) -> str:
    # Digests become path components: anything but 64 hex digits could escape the store.
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"invalid digest {digest!r}: expected 64 lowercase hex digits")
    return digest


def sealed_mode(mode: int) -> int:
    """Read-only for everyone, and readable by everyone: sandboxes read layers as an unprivileged uid."""
    if stat.S_ISDIR(mode) or mode & 0o111:
        return 0o555
    return 0o444


def seal_contents(top: Path) -> None:
    """Take `top`'s contents over: ours (a sandboxed build filled them as the app's uid), read-only, on disk.

    Never follows a link the build left: each file and folder is opened with O_NOFOLLOW and changed
    through its descriptor, links are changed themselves, and anything else (fifos, sockets) goes.
    So do links leading out of the layer (absolute, or up past its top): a node unpacking the layer's
    archive accepts links inside it only (`node.images`), so what runs is the same on every node.
    Owner first, then mode: the kernel clears set-id bits and file capabilities on a change of owner.
    """
    uid, gid = os.geteuid(), os.getegid()
    real_top = os.path.realpath(top)
    for dirpath, dirnames, filenames in os.walk(real_top, topdown=False):
        for name in (*filenames, *dirnames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if _leads_out(real_top, dirpath, os.readlink(path)):
                    os.unlink(path)
                    continue
                os.chown(path, uid, gid, follow_symlinks=False)
            elif stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                _take(path, stat.S_ISDIR(st.st_mode), uid, gid, seal=True)
            else:
                os.unlink(path)
    _take(str(top), True, uid, gid, seal=False)  # writable until renamed into place (see add_layer)


def _leads_out(top: str, folder: str, target: str) -> bool:
    """Whether a link in `folder` to `target` points outside `top` (a real path): by its text, or
    through the links it passes (read, never followed into a file), as tarfile's `data` filter sees it."""
    if os.path.isabs(target):
        return True
    by_text = os.path.normpath(os.path.join(os.path.relpath(folder, top), target))
    if by_text == ".." or by_text.startswith("../"):
        return True
    return os.path.commonpath([top, os.path.realpath(os.path.join(folder, target))]) != top


def _take(path: str, is_dir: bool, uid: int, gid: int, *, seal: bool) -> None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else os.O_NONBLOCK)
    fd = os.open(path, flags)
    try:
        os.fchown(fd, uid, gid)
        for acl in ("system.posix_acl_access", "system.posix_acl_default"):
            with contextlib.suppress(OSError):  # none set (ENODATA), or no ACLs here (ENOTSUP)
                os.removexattr(fd, acl)
        if seal:
            os.fchmod(fd, sealed_mode(os.fstat(fd).st_mode))
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(top: Path) -> None:
    # Sealed directories must be writable again before their entries can be removed.
    with contextlib.suppress(OSError):
        for dirpath, dirnames, _ in os.walk(top):
            os.chmod(dirpath, 0o700)
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    os.chmod(path, 0o700)
    shutil.rmtree(top, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Hashing:
    """A file object that writes through, counting bytes and hashing them as they go."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.out.write(data)


def write_archive(top: Path, out: BinaryIO) -> LayerArchive:
    """Write the tree under `top` to `out` as a tar whose bytes depend only on names, contents,
    modes and link targets: entries sorted, no times, owners or hard links. Uncompressed: writing
    and reading it costs a third of gzip's time, and a pull is one per release per node."""
    sink = _Hashing(out)
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        _archive_dir(tar, top, "")
    return LayerArchive(sha256=sink.hash.hexdigest(), size=sink.size)


def _archive_dir(tar: tarfile.TarFile, top: Path, rel: str) -> None:
    with os.scandir(top / rel if rel else top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        info = tarfile.TarInfo(name)
        info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = (
            st.st_mode & 0o7777,
            0,
            0,
            0,
            "",
            "",
        )
        if stat.S_ISLNK(st.st_mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(entry.path)
            tar.addfile(info)
        elif stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            _archive_dir(tar, top, name)
        elif stat.S_ISREG(st.st_mode):
            with open(entry.path, "rb") as f:
                info.type, info.size = tarfile.REGTYPE, os.fstat(f.fileno()).st_size
                tar.addfile(info, f)
        # anything else was dropped when the layer was sealed


def write_file(path: Path, data: bytes, tmp_dir: Path) -> None:
    """`path` holds `data`, whole, read-only, on disk; or is as it was."""
    fd, tmp_name = tempfile.mkstemp(prefix=f"{path.stem[:12]}-", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o400)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)
