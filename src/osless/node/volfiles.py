"""Files inside a volume, as the node (root) reads and writes them for `osless volumes`.

Everything in a volume is the app's to plant: symlinks to host files or another app's volume, fifos,
device nodes, sparse files of terabytes, files swapped while they are read. Every path is resolved by
the kernel, `openat2` beneath a descriptor of the volume's root held for the whole operation, with
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV: no `..` out, no link
of any kind followed (the last component included), no other mount crossed. Names taken from the
request are checked before that (`parts`), and each step that makes or removes something acts on
one name relative to a descriptor opened that way, so a swap between two calls cannot lead out.

Why this rather than a helper process at the app's uid in a mount namespace holding only the volume
(runtime.jail): the kernel's resolution flags close the same doors (a link cannot be followed at all,
and a volume is a filesystem of its own, so a hard link reaches only the app's own inodes), the
bytes stream in the node's process with no process started per request, and it works the same on a
host where the sandbox's namespaces are missing (`--no-sandbox`, plain-folder volumes). Root still
bypasses the app's file modes, which is the point (the app's data is the app owner's to read);
what the node writes is the app's (`fchown` to its uid) and a write never goes into an existing
inode: a new file is renamed into place, so a hard link the app made to it keeps its old bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from osless.contracts import MAX_VOLUME_PATH, volume_path

__all__ = [
    "MAX_ENTRIES",
    "MAX_PATH",
    "FileError",
    "Writer",
    "entries",
    "open_beneath",
    "parts",
    "read_chunks",
    "reader",
    "remove",
]

MAX_ENTRIES = 1000  # of a listing: the first ones the folder gives, said when there are more
# Folders a recursive remove goes down: each level holds a descriptor until it is empty, and the app
# may nest folders without end (the node's process has some 1024 descriptors for everything it does).
MAX_DEPTH = 128
MAX_PATH = MAX_VOLUME_PATH
CHUNK = 1024 * 1024

_RESOLVE = 0x01 | 0x02 | 0x04 | 0x08  # NO_XDEV | NO_MAGICLINKS | NO_SYMLINKS | BENEATH
_SYS_OPENAT2 = 437  # the same on x86_64 and the generic table (arm64, riscv)
_libc = ctypes.CDLL(None, use_errno=True)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class FileError(Exception):
    """An operation refused or failed: `status` and `code` as the node API answers them."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parts(path: str) -> list[str]:
    """The names of a relative path inside a volume ("" is its root); FileError 400 if it is not one."""
    try:
        return volume_path(path)
    except ValueError as e:
        raise FileError(400, "invalid_path", str(e)) from None


def open_beneath(root: int, names: list[str], flags: int, mode: int = 0) -> int:
    """A descriptor of `names` under the folder `root`, never following a link nor leaving it."""
    # openat2 refuses with O_PATH any flag but O_DIRECTORY, O_NOFOLLOW and O_CLOEXEC.
    extra = os.O_CLOEXEC if flags & os.O_PATH else os.O_CLOEXEC | os.O_NOCTTY
    how = _OpenHow(flags | extra, mode, _RESOLVE)
    path = os.fsencode("/".join(names) or ".")
    fd = _libc.syscall(_SYS_OPENAT2, root, path, ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        raise _refusal(ctypes.get_errno(), "/".join(names) or "/")
    return int(fd)


def _refusal(err: int, where: str) -> FileError:
    shown = where[:300]
    if err == errno.ENOENT:
        return FileError(404, "not_found", f"{shown} does not exist in the volume")
    if err in (errno.ELOOP, errno.EXDEV, errno.EAGAIN):
        return FileError(400, "link_refused", f"{shown} is or goes through a link: links are never followed")
    if err == errno.ENOTDIR:
        return FileError(400, "not_a_folder", f"a part of {shown} is not a folder")
    if err == errno.EISDIR:
        return FileError(400, "is_a_folder", f"{shown} is a folder")
    if err == errno.EEXIST:
        return FileError(409, "exists", f"{shown} exists already: pass --force to replace it")
    if err == errno.ENOTEMPTY:
        return FileError(409, "not_empty", f"{shown} is a folder that is not empty")
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FileError(413, "no_space", f"the volume has no space left for {shown}")
    if err in (errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV):
        return FileError(400, "not_a_file", f"{shown} cannot be opened (a device node or socket?)")
    if err == errno.ENOSYS:
        return FileError(501, "unsupported", "this node's kernel has no openat2 (Linux 5.6 or later needed)")
    return FileError(500, "io_error", f"{shown}: {os.strerror(err)}")


@contextlib.contextmanager
def _fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"  # fifo, socket, device node: listed, never read


def _entry(name: str, st: os.stat_result) -> dict[str, Any]:
    return {
        "name": os.fsencode(name).decode("utf-8", "replace"),
        "type": _kind(st.st_mode),
        "size": st.st_size,
        "mtime": st.st_mtime,
    }


def entries(root: int, names: list[str], limit: int = MAX_ENTRIES) -> tuple[list[dict[str, Any]], bool]:
    """What is at `names`: a folder's first `limit` entries (sorted by name), or the one file; and
    whether the folder holds more."""
    with _fd(open_beneath(root, names, os.O_PATH)) as fd:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode):
            return [_entry(names[-1], st)], False
    with _fd(open_beneath(root, names, os.O_RDONLY | os.O_DIRECTORY)) as fd:
        found: list[dict[str, Any]] = []
        more = False
        with os.scandir(fd) as it:
            for item in it:
                if len(found) >= limit:
                    more = True
                    break
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    found.append(_entry(item.name, os.stat(item.name, dir_fd=fd, follow_symlinks=False)))
    return sorted(found, key=lambda e: str(e["name"])), more


def reader(root: int, names: list[str], max_bytes: int) -> tuple[int, int]:
    """An open regular file at `names` and the bytes to send of it (its size when opened). A fifo,
    device or socket is refused, as is a file larger than `max_bytes` (the volume's size: only a
    sparse file is, and its holes would stream as zeros without end)."""
    if not names:
        raise FileError(400, "is_a_folder", "the volume's root is a folder: `osless volumes ls` lists it")
    # O_NONBLOCK: opening a fifo would otherwise wait for a writer the app may never bring.
    fd = open_beneath(root, names, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        where = "/".join(names)
        if stat.S_ISDIR(st.st_mode):
            raise FileError(400, "is_a_folder", f"{where} is a folder: get its files one by one")
        if not stat.S_ISREG(st.st_mode):
            raise FileError(400, "not_a_file", f"{where} is not a regular file (a fifo, socket or device)")
        if st.st_size > max_bytes:
            raise FileError(
                400, "too_large", f"{where} claims {st.st_size} bytes, more than the volume holds (sparse)"
            )
        os.set_blocking(fd, True)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_chunks(fd: int, size: int) -> Iterator[bytes]:
    """At most `size` bytes of `fd` (the file may change meanwhile: never more than it had)."""
    left = size
    while left > 0:
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:
            return
        left -= len(chunk)
        yield chunk


def _parent(root: int, names: list[str], uid: int) -> int:
    """A descriptor of the folder holding `names[-1]`, its missing folders made (the app's)."""
    fd = os.dup(root)
    try:
        for name in names[:-1]:
            try:
                nxt = open_beneath(fd, [name], os.O_RDONLY | os.O_DIRECTORY)
            except FileError as e:
                if e.code != "not_found":
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=fd)
                nxt = open_beneath(fd, [name], os.O_RDONLY | os.O_DIRECTORY)
                os.fchown(nxt, uid, uid)
            os.close(fd)
            fd = nxt
        return fd
    except OSError as e:
        os.close(fd)
        raise _refusal(e.errno or errno.EIO, "/".join(names)) from None
    except BaseException:
        os.close(fd)
        raise


@dataclass
class Writer:
    """A file being uploaded: written to a new name beside it, the app's, then put in place."""

    folder: int
    name: str
    tmp: str
    fd: int
    where: str

    @classmethod
    def start(cls, root: int, names: list[str], uid: int, *, force: bool) -> Writer:
        if not names:
            raise FileError(400, "invalid_path", "name the file to write inside the volume")
        where = "/".join(names)
        folder = _parent(root, names, uid)
        try:
            if not force and _exists(folder, names[-1]):  # said before the bytes come; commit checks again
                raise _refusal(errno.EEXIST, where)
            tmp = f".osless-upload-{secrets.token_hex(8)}"
            fd = open_beneath(folder, [tmp], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.fchown(fd, uid, uid)
            return cls(folder, names[-1], tmp, fd, where)
        except BaseException:
            os.close(folder)
            raise

    def write(self, chunk: bytes) -> None:
        try:
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as e:
            raise _refusal(e.errno or errno.EIO, self.where) from None

    def commit(self, *, force: bool) -> None:
        """Durable, then in place: with `force` over what is there (a file), else only if nothing is."""
        try:
            os.fsync(self.fd)
            if force:
                os.rename(self.tmp, self.name, src_dir_fd=self.folder, dst_dir_fd=self.folder)
            else:  # a link fails if the name exists, where a rename would replace it
                os.link(
                    self.tmp, self.name, src_dir_fd=self.folder, dst_dir_fd=self.folder, follow_symlinks=False
                )
                os.unlink(self.tmp, dir_fd=self.folder)
            os.fsync(self.folder)
        except OSError as e:
            raise _refusal(e.errno or errno.EIO, self.where) from None

    def close(self) -> None:
        """Let go; a file not committed is removed."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp, dir_fd=self.folder)
        os.close(self.folder)


def remove(root: int, names: list[str], *, recursive: bool) -> None:
    """Remove the file, link or (with `recursive`) folder at `names`; never the volume's root."""
    if not names:
        raise FileError(400, "invalid_path", "name what to remove inside the volume (not its root)")
    where = "/".join(names)
    with _fd(_parent_existing(root, names)) as folder:
        st = _lstat(folder, names[-1], where)
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise FileError(
                    400, "is_a_folder", f"{where} is a folder: pass -r to remove it and its files"
                )
            with _fd(open_beneath(folder, names[-1:], os.O_RDONLY | os.O_DIRECTORY)) as inner:
                _empty(inner, where, 1)
            _do(lambda: os.rmdir(names[-1], dir_fd=folder), where)
        else:
            _do(lambda: os.unlink(names[-1], dir_fd=folder), where)


def _exists(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _parent_existing(root: int, names: list[str]) -> int:
    return open_beneath(root, names[:-1], os.O_RDONLY | os.O_DIRECTORY)


def _lstat(folder: int, name: str, where: str) -> os.stat_result:
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False)
    except OSError as e:
        raise _refusal(e.errno or errno.EIO, where) from None


def _do(action: Any, where: str) -> None:
    try:
        action()
    except OSError as e:
        raise _refusal(e.errno or errno.EIO, where) from None


def _empty(folder: int, where: str, depth: int) -> None:
    """Remove everything in the open folder `folder` (`depth` below the one removed), each entry by its
    name in it: a folder swapped for a link meanwhile is opened with no link followed, so it fails
    there rather than lead out."""
    if depth > MAX_DEPTH:
        raise FileError(
            400,
            "too_deep",
            f"{where[:300]} nests folders more than {MAX_DEPTH} deep: remove its inner folders first",
        )
    try:
        with os.scandir(folder) as it:
            names = [item.name for item in it]
    except OSError as e:
        raise _refusal(e.errno or errno.EIO, where) from None
    for name in names:
        st = _lstat(folder, name, f"{where}/{name}")
        if stat.S_ISDIR(st.st_mode):
            with _fd(open_beneath(folder, [name], os.O_RDONLY | os.O_DIRECTORY)) as inner:
                _empty(inner, f"{where}/{name}", depth + 1)
            _do(lambda n=name: os.rmdir(n, dir_fd=folder), f"{where}/{name}")
        else:
            _do(lambda n=name: os.unlink(n, dir_fd=folder), f"{where}/{name}")
