"""Source archives: a deterministic tar.gz of an app's directory, and its safe extraction."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import pathspec

from osless.bounds import quoted

__all__ = ["ALWAYS_EXCLUDED", "MAX_HEADER_BYTES", "SourceError", "pack", "unpack"]

# Never part of an app's source, whatever its ignore files say.
ALWAYS_EXCLUDED = (
    ".git/",
    "__pycache__/",
    "*.pyc",
    ".venv/",
    "venv/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
)
IGNORE_FILES = (".gitignore", ".oslessignore")
_CHUNK = 1 << 20
# Extended headers (GNU longname/longlink, pax records) are read whole by tarfile, so their sizes are
# checked before: one of 300 MB compresses to 300 KB.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_CHAIN = 8  # extended headers in a row before a member (pack writes at most one)
MAX_HEADERS_TOTAL = 8 * 1024 * 1024  # of every extended header in an archive: tarfile keeps them all
MAX_PATH_CHARS = 4096  # PATH_MAX: a longer path could not be extracted anyway
_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
    tarfile.XHDTYPE: "pax header",
    tarfile.XGLTYPE: "pax global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
}


class SourceError(Exception):
    """A source tree could not be packed, or an archive is unsafe, too large or corrupt."""


def pack(root: Path) -> bytes:
    """A gzip tar of `root` whose bytes depend only on file names, contents and exec bits."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"{root} is not a directory: give the folder that holds your app's code")
    real_root = root.resolve()
    spec = _ignore_spec(root)
    buf = io.BytesIO()
    # gzip's own header carries a timestamp and a file name: pin both so equal trees give equal bytes.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _add_dir(tar, root, real_root, "", spec)
    return buf.getvalue()


def _ignore_spec(root: Path) -> pathspec.GitIgnoreSpec:
    lines = list(ALWAYS_EXCLUDED)
    for name in IGNORE_FILES:
        path = root / name
        if path.is_file():
            try:
                lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError as e:
                raise SourceError(f"cannot read {path}: {e}") from e
    # GitIgnoreSpec, not PathSpec("gitwildmatch"): the latter is deprecated in pathspec 1.x.
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _add_dir(
    tar: tarfile.TarFile, root: Path, real_root: Path, rel: str, spec: pathspec.GitIgnoreSpec
) -> None:
    try:
        entries = sorted(os.scandir(root / rel if rel else root), key=lambda e: e.name)
    except OSError as e:
        raise SourceError(f"cannot list {root / rel}: {e}") from e
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_symlink():
            target = _inside_target(Path(entry.path), real_root)
            # Only links to regular files inside the tree: a link out of it could leak the builder's
            # files, and a link to a directory could loop.
            if target is not None and not spec.match_file(name):
                _add_file(tar, name, target)
        elif entry.is_dir(follow_symlinks=False):
            if spec.match_file(name + "/"):
                continue
            info = _info(name, tarfile.DIRTYPE, 0o755)
            tar.addfile(info)
            _add_dir(tar, root, real_root, name, spec)
        elif entry.is_file(follow_symlinks=False) and not spec.match_file(name):
            _add_file(tar, name, Path(entry.path))
        # sockets, fifos and devices are not source code: skipped.


def _inside_target(link: Path, real_root: Path) -> Path | None:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(real_root) or not target.is_file():
        return None
    return target


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            info = _info(name, tarfile.REGTYPE, mode)
            info.size = st.st_size
            tar.addfile(info, f)
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e}") from e


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _BoundedInfo(tarfile.TarInfo):
    """A member header whose extended headers are size-checked before tarfile reads them.

    `_proc_member` is the hook tarfile documents for subclasses; it runs once the 512-byte header is
    parsed and before any data after it is read.
    """

    def _proc_member(self, tar: _BoundedTarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise SourceError(_SPARSE)
        what = _EXTENDED.get(self.type)
        if what is None:
            return self._proc(tar)
        if self.size > MAX_HEADER_BYTES:
            raise SourceError(
                f"the source archive has a {what} of {self.size} bytes, past the limit of "
                f"{MAX_HEADER_BYTES // 1024} KiB; pack it again with osless deploy"
            )
        tar.headers_total += self.size
        if tar.headers_total > MAX_HEADERS_TOTAL:
            raise SourceError(
                f"the source archive's extended headers pass {MAX_HEADERS_TOTAL >> 20} MiB in all; "
                "pack it again with osless deploy"
            )
        # tarfile reads the member after an extended header by recursing: count the depth.
        if tar.chain >= MAX_HEADER_CHAIN:
            raise SourceError(
                f"the source archive has more than {MAX_HEADER_CHAIN} extended headers in a row; "
                "pack it again with osless deploy"
            )
        tar.chain += 1
        try:
            return self._proc(tar)
        finally:
            tar.chain -= 1

    def _proc(self, tar: _BoundedTarFile) -> tarfile.TarInfo:
        info: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return info

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: object, tar: object) -> None:
        # Its sparse map is read for as many entries as a pax record says: refused before it starts.
        raise SourceError(_SPARSE)


_SPARSE = "the source archive has a sparse file; only regular files and folders are accepted"


class _BoundedTarFile(tarfile.TarFile):
    tarinfo = _BoundedInfo
    chain = 0  # extended headers being processed in a row
    headers_total = 0  # bytes of extended headers seen in this archive


def unpack(data: bytes, dest: Path, *, max_bytes: int, max_files: int) -> None:
    """Extract an archive made by `pack` into `dest`, refusing anything but plain files and folders.

    Raises SourceError for absolute paths, `..`, links, devices, more than `max_files` entries, more
    than `max_bytes` of file content, extended headers past their limits, or a corrupt archive.
    `dest` may be left partly filled: the caller extracts into a scratch directory.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    total = 0
    try:
        with _BoundedTarFile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            # Iterating reads one header at a time, so a huge member list is stopped at the limit.
            for member in tar:
                count += 1
                if count > max_files:
                    raise SourceError(
                        f"the source archive has more than {max_files} files and folders; "
                        "exclude generated or data files with .gitignore or .oslessignore"
                    )
                if member.sparse is not None:
                    raise SourceError(_SPARSE)
                parts = _safe_parts(member.name)
                if not parts:
                    continue
                target = dest.joinpath(*parts)
                if member.isdir():
                    target.mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise SourceError(
                        f"the source archive entry {quoted(member.name)} is a {_kind(member)}; "
                        "only regular files and folders are accepted"
                    )
                total += member.size
                if total > max_bytes:
                    raise SourceError(
                        f"the source is larger than {max_bytes // (1 << 20)} MB unpacked; "
                        "exclude large data or build outputs with .gitignore or .oslessignore"
                    )
                _extract_file(tar, member, target)
    except SourceError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise SourceError(f"the source archive is corrupt ({e}); pack it again with osless deploy") from e
    except OSError as e:
        raise SourceError(f"cannot extract the source archive into {dest}: {e}") from e


def _safe_parts(name: str) -> tuple[str, ...]:
    if len(name) > MAX_PATH_CHARS:
        raise SourceError(
            f"the source archive entry {quoted(name)} has a path longer than {MAX_PATH_CHARS} characters"
        )
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise SourceError(
            f"the source archive entry {quoted(name)} has an absolute path; only relative paths are accepted"
        )
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts or any("\\" in p or "\0" in p for p in parts):
        raise SourceError(f"the source archive entry {quoted(name)} points outside the app's folder")
    return parts


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device or fifo"
    return f"special entry (type {member.type!r})"


def _extract_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    src = tar.extractfile(member)
    if src is None:
        raise SourceError(f"the source archive entry {quoted(member.name)} has no content")
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    mode = 0o755 if member.mode & 0o111 else 0o644
    # O_EXCL: a second entry with the same name must not silently replace the first.
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SourceError(f"the source archive has {quoted(member.name)} twice; pack it again") from None
    with os.fdopen(fd, "wb") as out, src:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
