"""An app's volumes on this node: one ext4 image each, loop-mounted where only the node looks.

    DATA_DIR/volumes/<app>/<name>.img   the volume: a sparse image of its declared size (root, 600)
    DATA_DIR/volumes/<app>/.owner       the uid the images belong to (a new app of the same name
                                        gets a new uid, and never the old app's data)
    RUN_DIR/volumes/<app>/<name>        its mount point (nosuid, nodev), bound into the app's sandboxes

A filesystem of its own per volume, rather than project quotas: it needs no mount option on the
data dir's filesystem (prjquota is rarely set), gives the app a plain ENOSPC at its size, and the
kernel alone writes the image, so the node reads nothing the app wrote. The node only ever names
the image and the mount point, both in root's folders. It walks what is inside a volume only to
move a plain-folder one into its image, before any of the app runs, with tools that follow no link.

Where the tools or loop devices are missing (`unavailable_reason`), volumes are plain folders
(`DATA_DIR/volumes/<app>/<name>/`, as before sizes existed) and `osless up` says so loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from osless.node.isolation import owned_dir
from osless.sdk.app import VOLUME_RE, Volume

__all__ = ["TOOLS", "VolumeError", "Volumes", "mounts", "unavailable_reason"]

log = logging.getLogger("osless.node")

TOOLS = ("mkfs.ext4", "e2fsck", "resize2fs", "losetup", "mount", "umount")
MB = 1024 * 1024
TIMEOUT_S = 300.0  # a check or resize of a large image takes a while; a hung tool must not hang the node
# No noexec: apps keep virtualenvs and compiled models in volumes. nosuid and nodev: the host's
# kernel honours neither a set-uid bit nor a device node from a filesystem the app filled.
MOUNT_OPTIONS = "nosuid,nodev"


class VolumeError(Exception):
    """A volume could not be made ready; the message says which and why."""


def unavailable_reason() -> str | None:
    """Why sized volumes do not work on this host, found by making, mounting and removing one."""
    if os.geteuid() != 0:
        return "not root: cannot attach loop devices nor mount filesystems"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH (install e2fsprogs and util-linux)"
    with tempfile.TemporaryDirectory(prefix="osless-volume-probe-", ignore_cleanup_errors=True) as tmp:
        image, point = Path(os.path.realpath(tmp)) / "probe.img", Path(os.path.realpath(tmp)) / "mnt"
        point.mkdir()
        try:
            _make_image(image, 16, uid=0)
            _mount(image, point)
            _unmount(point)
        except VolumeError as e:
            with contextlib.suppress(VolumeError):
                _unmount(point)
            return str(e)
    return None


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VolumeError(f"{cmd[0]} failed: {e}") from e
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[-300:]
        raise VolumeError(f"{' '.join(cmd)} exited {done.returncode}: {said}")
    return done.stdout


def mounts() -> dict[str, str]:
    """This mount namespace's mount points (their host paths) and the device each mounts."""
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            found[_unescape(fields[4])] = _unescape(fields[sep + 2])
    return found


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _backing_file(device: str) -> str | None:
    """The file behind a loop device, or None if `device` is none."""
    m = re.fullmatch(r"/dev/(loop\d+)", device)
    if m is None:
        return None
    try:
        return Path(f"/sys/block/{m.group(1)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _make_image(image: Path, size_mb: int, uid: int) -> None:
    """A new ext4 image at `image`, sparse: it takes disk as it fills. Built aside, then renamed."""
    tmp = image.with_name(f".{image.name}.new")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.truncate(size_mb * MB)
    # -m 0: the app's uid is not root outside, so blocks reserved for root would be lost to it.
    # The lazy options leave the unwritten parts of a fresh sparse file as holes (they read as zeros).
    _run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-m",
        "0",
        "-E",
        f"root_owner={uid}:{uid},lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        str(tmp),
    )
    tmp.rename(image)


def _mount(image: Path, point: Path) -> str:
    """Mount `image` on `point`; returns its loop device. --nooverlap reuses the device already
    backed by this image (one left mounted in a sandbox that outlived us): two devices on one image
    would be two filesystems writing the same blocks."""
    device = _run("losetup", "--find", "--show", "--nooverlap", str(image)).strip()
    try:
        _run("mount", "-t", "ext4", "-o", MOUNT_OPTIONS, device, str(point))
    except VolumeError:
        with contextlib.suppress(VolumeError):
            _run("losetup", "--detach", device)
        raise
    return device


def _unmount(point: Path) -> None:
    device = mounts().get(str(point))
    if device is None:
        return
    try:
        _run("umount", str(point))
    except VolumeError:
        _run("umount", "--lazy", str(point))  # busy: gone from view now, released when unused
    if _backing_file(device) is not None:
        # A device still held (by a sandbox that outlives this) is freed when that lets go.
        with contextlib.suppress(VolumeError):
            _run("losetup", "--detach", device)


class Volumes:
    """Makes an app's volumes ready before its zygote starts, and puts them away after."""

    def __init__(
        self, data_dir: Path, run_dir: Path, *, images: bool, warn: Callable[[str, str], None]
    ) -> None:
        """`images`: sized ext4 images (this host can), else plain folders. `warn(app, message)`
        writes to the app's logs."""
        # Real paths: the kernel names mount points and loop devices' files by them.
        self.root = Path(os.path.realpath(data_dir)) / "volumes"
        self.points = Path(os.path.realpath(run_dir)) / "volumes"
        self.images = images
        self.warn = warn
        self._locks: dict[str, asyncio.Lock] = {}
        for folder in (self.root, self.points):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    def mounted_apps(self) -> set[str]:
        """Apps with a volume mounted here, this run's or one a killed run left (mounts outlive it)."""
        prefix = str(self.points) + "/"
        return {p[len(prefix) :].split("/")[0] for p in mounts() if p.startswith(prefix)}

    def apps_on_disk(self) -> set[str]:
        return {p.name for p in self.root.iterdir() if p.is_dir()} if self.root.is_dir() else set()

    async def attach(self, app: str, uid: int, volumes: dict[str, Volume]) -> dict[str, str]:
        """The host folder to bind at each path of `volumes`, mounted and of its size."""
        notes: list[str] = []
        try:
            async with self._lock(app):
                return await asyncio.to_thread(self._attach, app, uid, volumes, notes)
        finally:
            for note in notes:  # written here, on the loop: the app's log writer is not thread-safe
                self.warn(app, note)

    async def detach(self, app: str, in_use: Callable[[], bool]) -> None:
        """Unmount the app's volumes, unless `in_use()` says a zygote of it runs or starts."""
        async with self._lock(app):
            if not in_use():
                await asyncio.to_thread(self._detach, app)

    async def delete(self, app: str, in_use: Callable[[], bool]) -> None:
        """Remove a deleted app's volumes, data and all, once nothing of it runs here."""
        async with self._lock(app):
            if not in_use():
                await asyncio.to_thread(self._delete, app)
                log.info("deleted the volumes of the deleted app %s", app)

    async def detach_all(self) -> None:
        for app in self.mounted_apps():
            try:
                await self.detach(app, lambda: False)
            except (VolumeError, OSError) as e:  # the next start finds them and puts them away
                log.warning("the volumes of %s stay mounted: %s", app, e)

    async def held(self, app: str, uid: int) -> list[dict[str, Any]]:
        """The volumes of `app` (whose uid is `uid`) on this node's disk: name, size and bytes used
        (None: a plain folder's are the host disk's), and whether an instance here has it mounted now.
        Those of an earlier app of the same name (another uid), deleted, are not its: none are listed."""
        async with self._lock(app):
            return await asyncio.to_thread(self._held, app, uid)

    async def open_root(self, app: str, name: str, uid: int) -> tuple[int, int]:
        """A descriptor of the root of volume `name` of `app`, and the app's uid; the caller closes it.
        FileNotFoundError if the volume here is not of the app whose uid is `uid`: an earlier app of
        that name, deleted, whose volumes the node has not put away yet (its data, never the new app's).

        A volume not mounted now (the app at zero here) is mounted aside and at once lazily unmounted:
        the descriptor alone keeps its filesystem alive, and it goes when that is closed, so nothing is
        left mounted by a request, even one killed midway. Its loop device is freed then too."""
        async with self._lock(app):
            return await asyncio.to_thread(self._open_root, app, name, uid)

    # -- on a worker thread, one app at a time -------------------------------------------------

    def _owner(self, app: str) -> int | None:
        """The uid of the app whose volumes are in the app's folder here (`.owner`), if any."""
        try:
            return int((self.root / app / ".owner").read_text().strip())
        except (OSError, ValueError):
            return None

    def _held(self, app: str, uid: int) -> list[dict[str, Any]]:
        folder = self.root / app
        if not folder.is_dir() or self._owner(app) != uid:
            return []
        found: dict[str, dict[str, Any]] = {}
        for entry in folder.iterdir():
            name = entry.name.removesuffix(".img")
            if entry.name.startswith(".") or not VOLUME_RE.fullmatch(name) or entry.is_symlink():
                continue
            if entry.name.endswith(".img") and entry.is_file():
                point = self.points / app / name
                mounted = _backing_file(mounts().get(str(point), "")) == str(entry)
                if mounted:
                    st = os.statvfs(point)
                    size, used = st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize
                else:
                    size, used = _filesystem_usage(entry)
                found[name] = {"name": name, "size_bytes": size, "used_bytes": used, "mounted": mounted}
            elif entry.is_dir() and name not in found:
                found[name] = {"name": name, "size_bytes": None, "used_bytes": None, "mounted": False}
        return sorted(found.values(), key=lambda v: str(v["name"]))

    def _open_root(self, app: str, name: str, uid: int) -> tuple[int, int]:
        folder = self.root / app
        if self._owner(app) != uid:
            raise FileNotFoundError(f"no volume of {app} on this node")
        image = folder / f"{name}.img"
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        if not (image.is_file() and not image.is_symlink()):
            plain = folder / name
            if not plain.is_dir() or plain.is_symlink():
                raise FileNotFoundError(f"no volume {name!r} of {app} on this node")
            return os.open(plain, flags), uid
        point = self.points / app / name
        if _backing_file(mounts().get(str(point), "")) == str(image):
            return os.open(point, flags), uid
        aside = Path(os.path.realpath(self.points.parent)) / "volume-access"
        aside.mkdir(mode=0o700, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix=f"{app}-{name}-", dir=aside))
        try:
            device = _mount(image, private)
            try:
                fd = os.open(private, flags)
            finally:
                with contextlib.suppress(VolumeError):
                    _run("umount", "--lazy", str(private))
                with contextlib.suppress(VolumeError):
                    _run("losetup", "--detach", device)  # freed once the descriptor lets go
        finally:
            with contextlib.suppress(OSError):
                private.rmdir()
        return fd, uid

    def _attach(self, app: str, uid: int, volumes: dict[str, Volume], notes: list[str]) -> dict[str, str]:
        if not volumes:
            return {}
        folder = self._app_folder(app, uid, notes)
        ready: dict[str, str] = {}
        for volume in {v.name: v for v in volumes.values()}.values():
            if self.images:
                ready[volume.name] = str(self._attach_image(app, folder, uid, volume, notes))
            elif (folder / f"{volume.name}.img").exists():
                raise VolumeError(
                    f"volume {volume.name!r} of {app} is a filesystem image, which this host cannot mount "
                    "now (`osless doctor` says why: volume quotas); install the missing tools"
                )
            else:
                ready[volume.name] = str(owned_dir(folder / volume.name, uid))
        return {inside: ready[v.name] for inside, v in volumes.items()}

    def _app_folder(self, app: str, uid: int, notes: list[str]) -> Path:
        """The app's folder of images, emptied first if an earlier app of this name left it."""
        folder = self.root / app
        owner = folder / ".owner"
        if owner.exists() and owner.read_text().strip() != str(uid):
            notes.append(f"volumes left by an earlier app named {app} were deleted; this app starts empty")
            self._delete(app)
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)
        if not owner.exists():
            tmp = folder / ".owner.new"
            tmp.write_text(f"{uid}\n")
            tmp.rename(owner)
        return folder

    def _attach_image(self, app: str, folder: Path, uid: int, volume: Volume, notes: list[str]) -> Path:
        image = folder / f"{volume.name}.img"
        point = self.points / app / volume.name
        legacy = folder / volume.name  # a plain folder: from before sizes, or from a host without the tools
        migrate = legacy.is_dir() and not legacy.is_symlink()
        if not image.exists():
            size = max(volume.size_mb, _migration_mb(legacy)) if migrate else volume.size_mb
            if size > volume.size_mb:
                notes.append(f"volume {volume.name} holds more than {volume.size_mb} MB: made it {size} MB")
            self._check_promise(app, image, size)
            _make_image(image, size, uid)
        point.mkdir(mode=0o700, parents=True, exist_ok=True)  # root's: nobody else writes it unmounted
        device = mounts().get(str(point))
        if device is not None and _backing_file(device) != str(image):
            _unmount(point)  # not this image (it was replaced): never hand it to the app
            device = None
        have = _filesystem_mb(image)
        if have < volume.size_mb:
            self._check_promise(app, image, volume.size_mb)
        if have < volume.size_mb and device is None and not _loop_devices(image):
            _grow_offline(image, volume.size_mb)  # the simplest resize: nobody has it mounted
            have = volume.size_mb
        if device is None:
            device = _mount(image, point)
        if have < volume.size_mb:
            _grow_online(volume, image, device, have, notes)
        elif have > volume.size_mb:
            notes.append(
                f"volume {volume.name} is {have} MB and the release asks for {volume.size_mb} MB: a volume "
                f"never shrinks (its data could be lost), so it stays at {have} MB",
            )
        if migrate:
            _migrate(legacy, point, uid)
            notes.append(f"volume {volume.name} moved from a plain folder into its image")
        return point

    def _check_promise(self, app: str, image: Path, size_mb: int) -> None:
        """Images are sparse, and their sizes are the apps' to declare: a size only protects the
        host if the node never promises its volumes more than its disk holds, all apps together."""
        disk = os.statvfs(self.root)
        disk_mb = disk.f_blocks * disk.f_frsize // MB
        promised = sum(os.lstat(other).st_size // MB for other in self.root.glob("*/*.img") if other != image)
        if promised + size_mb > disk_mb:
            raise VolumeError(
                f"volume {image.stem!r} of {app} asks for {size_mb} MB, but this node's disk holds "
                f"{disk_mb} MB and its volumes are promised {promised} MB already: declare a smaller "
                "size_mb, or delete volumes (of apps deleted, or no longer needed)"
            )

    def _detach(self, app: str) -> None:
        folder = self.points / app
        prefix = str(folder) + "/"
        for point in [p for p in mounts() if p.startswith(prefix)]:
            _unmount(Path(point))
        if folder.is_dir():
            for empty in folder.iterdir():
                with contextlib.suppress(OSError):
                    empty.rmdir()  # an empty mount point; a failure leaves a folder, never data
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _delete(self, app: str) -> None:
        self._detach(app)
        # rmtree never follows a symlink, so a plain-folder volume cannot lead it out of its tree.
        shutil.rmtree(self.root / app, ignore_errors=True)


def _loop_devices(image: Path) -> list[str]:
    """Loop devices backed by `image`: while any is, the filesystem may be live (in a sandbox that
    copied the node's mounts) and no tool may touch the image offline."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip() == str(image):
                found.append("/dev/" + backing.parent.parent.name)
    return found


def _filesystem_mb(image: Path) -> int:
    """The size of the ext4 filesystem in `image`, from its superblock (written by the kernel alone)."""
    return _filesystem_usage(image)[0] // MB


def _filesystem_usage(image: Path) -> tuple[int, int]:
    """Size and bytes used of the ext4 filesystem in an image nobody mounts (its superblock's counts
    are exact once unmounted)."""
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise VolumeError(f"{image} holds no ext4 filesystem")
    blocks, free = struct.unpack_from("<I", sb, 0x4)[0], struct.unpack_from("<I", sb, 0xC)[0]
    if struct.unpack_from("<I", sb, 0x60)[0] & 0x80:  # 64bit: the high halves
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        free |= struct.unpack_from("<I", sb, 0x158)[0] << 32
    block = 1024 << struct.unpack_from("<I", sb, 0x18)[0]
    return blocks * block, (blocks - free) * block


def _grow_offline(image: Path, size_mb: int) -> None:
    with open(image, "r+b") as f:
        if os.fstat(f.fileno()).st_size < size_mb * MB:
            f.truncate(size_mb * MB)
    try:
        _run("e2fsck", "-f", "-p", str(image))
    except VolumeError as e:
        if "exited 1:" not in str(e):  # 1: errors found and fixed
            raise
    _run("resize2fs", str(image))


def _grow_online(volume: Volume, image: Path, device: str, have: int, notes: list[str]) -> None:
    with open(image, "r+b") as f:
        if os.fstat(f.fileno()).st_size < volume.size_mb * MB:
            f.truncate(volume.size_mb * MB)
    try:
        _run("losetup", "--set-capacity", device)
        _run("resize2fs", device)
    except VolumeError as e:
        # Online resizing needs CAP_SYS_RESOURCE, which some hosts withhold even from root. The
        # image file has its new size already: the filesystem grows to it at the next mount.
        notes.append(f"volume {volume.name} stays at {have} MB until the app's instances here all stop ({e})")


def _migration_mb(legacy: Path) -> int:
    """What a plain-folder volume's data needs in an image, counted without following links."""
    used = 0
    for top, dirs, files in os.walk(legacy):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                used += os.lstat(os.path.join(top, name)).st_blocks * 512
    return int(used * 1.25) // MB + 16


def _migrate(legacy: Path, point: Path, uid: int) -> None:
    """Copy a plain-folder volume into its image, then remove the folder. Nothing of the app runs
    yet; cp -a copies links as links and never follows them. Run again if interrupted."""
    _run("cp", "-a", "--no-preserve=ownership", f"{legacy}/.", str(point))
    _run("chown", "-R", "--no-dereference", f"{uid}:{uid}", str(point))
    _run("sync", "--file-system", str(point))  # on disk before the only other copy goes
    shutil.rmtree(legacy)
