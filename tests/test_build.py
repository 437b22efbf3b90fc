"""The build part: source archives, the image store and the builder (real uv, real subprocesses).

The builder is the one `osless up` ships: every step in the real jail, as the app's uid, with the
build's egress to the package index; its tests build real packages from PyPI.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from osless.builder import (
    BUILD_NPROC,
    Builder,
    BuildError,
    BuildResult,
    SourceError,
    pack,
    stop_all_builds,
    unpack,
)
from osless.builder.egress import BuildEgress, index_hosts
from osless.contracts import ImageManifest
from osless.images import (
    MAX_MANIFEST_BYTES,
    ImageNotFoundError,
    ImageStore,
    ManifestTooLarge,
    canonical_json,
    sha256_hex,
    write_archive,
)
from osless.node.isolation import build_spec
from tests.platform import Platform, copy_app
from tests.test_images import manifest_fields

APPS = Path(__file__).parent / "apps"
SIX_LOCK = "six==1.16.0\n"


# -- source: pack ---------------------------------------------------------------------------------


def _write(path: Path, text: str = "x", mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _names(archive: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return tar.getnames()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    _write(root / "app.py", "import osless\n")
    _write(root / "run.sh", "#!/bin/sh\n", 0o775)
    _write(root / ".gitignore", "secret.txt\nbuild/\n*.log\n!keep.log\n")
    _write(root / ".oslessignore", "data/\n")
    ignored = "secret.txt build/out.txt x.log pkg/y.log data/big.bin .git/HEAD __pycache__/a.pyc pkg/s.pyc"
    ignored += " pkg/__pycache__/m.pyc .venv/cfg venv/cfg .mypy_cache/x .pytest_cache/x .ruff_cache/x"
    for name in ignored.split():
        _write(root / name)
    _write(root / "keep.log", "kept")
    _write(root / "pkg" / "mod.py", "VALUE = 1\n")
    (root / "empty").mkdir()
    _write(tmp_path / "outside.txt", "not yours")
    os.symlink("app.py", root / "link_in")
    os.symlink("../outside.txt", root / "link_out")
    os.symlink("pkg", root / "link_dir")
    os.symlink("nowhere", root / "broken")
    return root


def test_pack_excludes_and_links(tree: Path) -> None:
    archive = pack(tree)
    expected = ".gitignore .oslessignore app.py empty keep.log link_in pkg pkg/mod.py run.sh"
    assert _names(archive) == expected.split()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        link = tar.extractfile("link_in")
        assert link is not None and link.read() == b"import osless\n"
    assert members["link_in"].isreg()
    assert members["run.sh"].mode == 0o755 and members["app.py"].mode == 0o644
    assert members["pkg"].isdir() and members["pkg"].mode == 0o755
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members.values())


def test_pack_is_deterministic(tree: Path, tmp_path: Path) -> None:
    first = pack(tree)
    assert pack(tree) == first
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    for path in copy.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_000_000, 1_000_000))
    (copy / "app.py").chmod(0o600)  # only the exec bit is kept
    assert pack(copy) == first
    (copy / "app.py").write_text("import osless  # changed\n")
    assert pack(copy) != first


def test_pack_refuses_a_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a directory"):
        pack(tmp_path / "nope")


# -- source: unpack -------------------------------------------------------------------------------


def _tar(*members: tuple[str, bytes, str], link: str = "app.py", pax_path: str | None = None) -> bytes:
    """A tar.gz of (name, content, kind) with kind in file/dir/sym/hard/chr/blk/fifo; links point at
    `link`; `pax_path` overrides the first member's name in a pax record, as tar readers honour."""
    kinds = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "sym": tarfile.SYMTYPE,
        "hard": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, content, kind) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.type = kinds[kind]
            if pax_path is not None and i == 0:
                info.pax_headers = {"path": pax_path}
            if kind in ("sym", "hard"):
                info.linkname = link
            info.size = len(content) if kind == "file" else 0
            tar.addfile(info, io.BytesIO(content) if kind == "file" else None)
    return buf.getvalue()


def test_unpack_roundtrip(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    unpack(pack(tree), dest, max_bytes=10_000, max_files=100)
    assert (dest / "pkg" / "mod.py").read_text() == "VALUE = 1\n"
    assert (dest / "link_in").read_text() == "import osless\n" and not (dest / "link_in").is_symlink()
    assert stat.S_IMODE((dest / "run.sh").stat().st_mode) & 0o100
    assert (dest / "empty").is_dir() and not (dest / "secret.txt").exists()


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (_tar(("../x", b"x", "file")), "outside"),
        (_tar(("a/../../x", b"x", "file")), "outside"),
        (_tar(("/etc/x", b"x", "file")), "absolute"),
        (_tar(("ok.py", b"x", "file"), pax_path="../../x"), "outside"),
        (_tar(("ok.py", b"x", "file"), pax_path="/etc/x"), "absolute"),
        (_tar(("app.py", b"x", "file"), ("evil", b"", "sym")), "symbolic link"),
        (_tar(("etc", b"", "sym"), ("etc/x", b"x", "file"), link="/etc"), "symbolic link"),
        (_tar(("app.py", b"x", "file"), ("evil", b"", "hard")), "hard link"),
        (_tar(("x", b"", "hard"), link="/etc/passwd"), "hard link"),
        (_tar(("dev", b"", "chr")), "device"),
        (_tar(("disk", b"", "blk")), "device"),
        (_tar(("pipe", b"", "fifo")), "fifo"),
        (_tar(("app.py", b"x", "file"), ("app.py", b"y", "file")), "twice"),
        (_tar(*[(f"f{i}.py", b"", "file") for i in range(6)]), "more than 5 files"),
        (_tar(("big.bin", b"x" * 2000, "file")), "larger than"),
        (b"not a tar at all", "corrupt"),
        (_tar(*[(f"f{i}.py", os.urandom(300), "file") for i in range(3)])[:-200], "corrupt"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "pax-path-dotdot",
        "pax-path-absolute",
        "symlink",
        "symlink-dir-then-file-through-it",
        "hardlink",
        "hardlink-to-host-file",
        "device",
        "block-device",
        "fifo",
        "duplicate",
        "too-many-files",
        "too-many-bytes",
        "garbage",
        "truncated",
    ],
)
def test_unpack_rejects(archive: bytes, message: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=message):
        unpack(archive, tmp_path / "out", max_bytes=1000, max_files=5)
    assert not (tmp_path / "x").exists() and not Path("/etc/x").exists()


def _header(name: str, kind: bytes, size: int, **pax: str) -> bytes:
    """One raw member header (with its pax header when `pax` is given), as a hostile packer writes it."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    if pax:
        info.pax_headers = pax
        return info.tobuf(format=tarfile.PAX_FORMAT)
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def bomb(kind: bytes, size: int) -> bytes:
    """A tar.gz whose first entry is an extended header (`kind`) of `size` bytes of 'a', then app.py."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(_header("././@LongLink", kind, size))
        chunk = b"a" * (1 << 20)
        for start in range(0, size, len(chunk)):
            gz.write(chunk[: size - start])
        gz.write(b"\0" * (-size % tarfile.BLOCKSIZE))
        gz.write(_header("app.py", tarfile.REGTYPE, 0) + b"\0" * 1024)
    return buf.getvalue()


def _gz(*blocks: bytes) -> bytes:
    return gzip.compress(b"".join(blocks) + b"\0" * 1024, mtime=0)


def test_a_longname_bomb_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # Finding 4: 300 MB of GNU long name in a 300 KB upload; tarfile would read it whole.
    archive = bomb(tarfile.GNUTYPE_LONGNAME, 300 * 1024 * 1024)
    assert len(archive) < 400 * 1024
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(SourceError) as e:
            unpack(archive, tmp_path / "out", max_bytes=200 << 20, max_files=20_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1
    assert peak < 4 * 1024 * 1024, f"unpacking peaked at {peak >> 20} MiB"
    assert "GNU long name of 314572800 bytes, past the limit of 64 KiB" in str(e.value)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (tarfile.GNUTYPE_LONGLINK, "GNU long link name"),
        (tarfile.XHDTYPE, "pax header"),
        (tarfile.XGLTYPE, "pax global header"),
        (tarfile.SOLARIS_XHDTYPE, "Solaris extended header"),
    ],
    ids=["longlink", "pax", "pax-global", "solaris"],
)
def test_extended_headers_past_their_limit_are_refused(kind: bytes, what: str, tmp_path: Path) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(SourceError, match=f"has a {what} of 67108864 bytes, past the limit"):
            unpack(bomb(kind, 64 << 20), tmp_path / "out", max_bytes=200 << 20, max_files=20_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"unpacking peaked at {peak >> 20} MiB"


def test_extended_headers_within_their_limit_still_work(tmp_path: Path) -> None:
    # Long names (pack writes them as pax headers) and a global header, as `git archive` writes one.
    name = "pkg/" + "d" * 200 + "/m.py"
    archive = _gz(
        _header("pax_global_header", tarfile.XGLTYPE, 52),
        _padded(b"52 comment=0123456789abcdef0123456789abcdef01234567\n"),
        _header(name, tarfile.REGTYPE, 2, path=name),
        _padded(b"ok"),
        _header("x", tarfile.GNUTYPE_LONGNAME, 9),
        _padded(b"long.py\0"),
        _header("x", tarfile.REGTYPE, 3),
        _padded(b"yes"),
    )
    unpack(archive, tmp_path / "out", max_bytes=1000, max_files=10)
    assert (tmp_path / "out" / name).read_text() == "ok"
    assert (tmp_path / "out" / "long.py").read_text() == "yes"


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    record = _padded(b"10 a=bcde\n")
    chain = [_header("x", tarfile.XHDTYPE, 10) + record for _ in range(9)]
    with pytest.raises(SourceError, match="more than 8 extended headers in a row"):
        unpack(_gz(*chain, _header("a.py", tarfile.REGTYPE, 0)), tmp_path / "out", max_bytes=10, max_files=5)


def test_extended_headers_in_all_are_bounded(tmp_path: Path) -> None:
    # Each under the limit, but tarfile keeps every one (global ones for good): 8 MiB in all at most.
    blocks = []
    for i in range(200):
        record = b"60012 k%03d=%s\n" % (i, b"v" * 60_000)
        assert len(record) == 60012
        blocks += [_header("g", tarfile.XGLTYPE, len(record)), _padded(record)]
        blocks.append(_header(f"f{i}", tarfile.REGTYPE, 0))
    with pytest.raises(SourceError, match="extended headers pass 8 MiB in all"):
        unpack(_gz(*blocks), tmp_path / "out", max_bytes=10, max_files=1000)


def test_sparse_files_are_refused_before_their_map_is_read(tmp_path: Path) -> None:
    old_gnu = _gz(_header("s.py", tarfile.GNUTYPE_SPARSE, 0))
    with pytest.raises(SourceError, match="sparse file"):
        unpack(old_gnu, tmp_path / "a", max_bytes=10, max_files=5)
    # GNU sparse 1.0: a map of as many numbers as the pax header says, read from the member's data.
    pax_10 = gzip.compress(
        _header("s.py", tarfile.REGTYPE, 1 << 30, **{"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})
        + b"99999999999\n"
        + b"1\n" * (8 << 20),
        mtime=0,
    )
    with pytest.raises(SourceError, match="sparse file"):
        unpack(pax_10, tmp_path / "b", max_bytes=10, max_files=5)


def test_long_names_are_refused_and_quoted_short(tmp_path: Path) -> None:
    name = "a" * 60_000
    archive = _gz(_header(name, tarfile.REGTYPE, 0, path=name))
    with pytest.raises(SourceError, match="longer than 4096 characters") as e:
        unpack(archive, tmp_path / "out", max_bytes=10, max_files=5)
    assert len(str(e.value)) < 400 and "(60000 characters)" in str(e.value)


# -- image store ----------------------------------------------------------------------------------


def test_image_store_layers_and_manifests(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    digest = sha256_hex(b"layer")
    assert not store.has_layer(digest)

    def fill(d: Path) -> None:
        (d / "sub").mkdir()
        (d / "sub" / "f.txt").write_text("hi")

    path = store.add_layer(digest, fill)
    assert path == store.layer_path(digest) and store.has_layer(digest)
    assert (path / "sub" / "f.txt").read_text() == "hi"
    for p in (path, path / "sub", path / "sub" / "f.txt"):
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, p
    assert store.add_layer(digest, lambda d: pytest.fail("must not rebuild")) == path
    assert list((tmp_path / "images" / "tmp").iterdir()) == []

    fields = manifest_fields(lock="é==1\n")
    image = store.put_manifest(ImageManifest.model_validate(fields))
    assert b'"lock":"\\u00e9==1\\n"' in store.manifest_bytes(image)  # sorted keys, no spaces, ASCII
    assert image == sha256_hex(canonical_json(fields)) == sha256_hex(store.manifest_bytes(image))
    assert store.get_manifest(image).model_dump() == fields and store.has_manifest(image)
    with pytest.raises(ImageNotFoundError, match=r"no image sha256:0+ in the image store") as e:
        store.get_manifest("0" * 64)
    assert isinstance(e.value, KeyError)
    with pytest.raises(ValueError, match="invalid digest"):
        store.layer_path("../../etc")


def test_image_store_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    digest = sha256_hex(b"broken")

    def fill(d: Path) -> None:
        (d / "sub").mkdir()
        (d / "sub" / "half").write_text("half")
        raise RuntimeError("fill failed")

    with pytest.raises(RuntimeError, match="fill failed"):
        store.add_layer(digest, fill)
    assert not store.has_layer(digest) and list((tmp_path / "tmp").iterdir()) == []


def test_image_store_keeps_a_layer_made_meanwhile(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    digest = sha256_hex(b"race")

    def fill(d: Path) -> None:
        (d / "mine").write_text("loser")
        # Another build finishes the same layer while this one is still filling.
        store.add_layer(digest, lambda other: (other / "theirs").write_text("winner"))

    path = store.add_layer(digest, fill)
    assert [p.name for p in path.iterdir()] == ["theirs"]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_image_store_collects_what_no_kept_image_names(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    code, deps, old_code = (sha256_hex(x) for x in (b"code", b"deps", b"old"))
    for digest in (code, deps, old_code):
        store.add_layer(digest, lambda d: (d / "f").write_text("x" * 1000))
    kept = store.put_manifest(
        ImageManifest.model_validate(
            manifest_fields(layers={"code": code, "deps": deps}, lock="six==1.16.0\n")
        )
    )
    old = store.put_manifest(
        ImageManifest.model_validate(
            manifest_fields(layers={"code": old_code, "deps": deps}, lock="six==1.15.0\n")
        )
    )
    for lock in ("six==1.16.0\n", "six==1.15.0\n"):
        (store.locks_dir / f"{sha256_hex(lock.encode() + b'req')}.txt").write_text(lock)

    def collect(grace_s: float, busy: bool = False) -> tuple[int, int, int, bool]:
        c = store.collect(
            keep_images={kept}, keep_locks={sha256_hex(b"six==1.16.0\n")}, grace_s=grace_s, busy=lambda: busy
        )
        return c.manifests, c.layers, c.locks, c.stopped

    assert collect(grace_s=3600) == (0, 0, 0, False)  # all of it is younger than the grace
    assert collect(grace_s=0, busy=True) == (0, 0, 0, True)  # a build is running: nothing goes
    assert collect(grace_s=0) == (1, 1, 1, False)
    assert store.has_manifest(kept) and not store.has_manifest(old)
    assert store.has_layer(code) and store.has_layer(deps) and not store.has_layer(old_code)
    assert [f.read_text() for f in store.locks_dir.iterdir()] == ["six==1.16.0\n"]
    assert collect(grace_s=0) == (0, 0, 0, False)


# -- builder --------------------------------------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Uids:
    """What the API's `app_uid` does for the builder: one host uid per app name, never shared."""

    def __init__(self) -> None:
        self.uids: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        return self.uids.setdefault(name, 170_000 + len(self.uids))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def store(data_dir: Path) -> ImageStore:
    # One store for the whole session, so that later builds hit the lock and layer caches.
    return ImageStore(data_dir / "images")


@pytest.fixture(scope="session")
def uids() -> Uids:
    return Uids()


@pytest.fixture(scope="session")
def egress(data_dir: Path) -> Iterator[BuildEgress]:
    egress = BuildEgress(data_dir / "run" / "build-egress", hosts=index_hosts(os.environ))
    yield egress
    egress.close()


class AppBuilder(Builder):
    """The builder as the API drives it: each app's steps run as the uid the API gives that app."""

    def __init__(self, *args: Any, uids: Uids, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.uids = uids

    def build(self, archive: bytes, log: Callable[[str], None], **kw: Any) -> BuildResult:
        return super().build(archive, log, uid_for=self.uids, **kw)


@pytest.fixture(scope="session")
def builder(store: ImageStore, data_dir: Path, egress: BuildEgress, uids: Uids) -> Builder:
    """The builder as `osless up` makes it: sandboxed steps, the build's egress."""
    sandbox = functools.partial(build_spec, data_dir=data_dir, run_dir=data_dir / "run")
    return AppBuilder(store, sandbox=sandbox, egress=egress, uids=uids)


@pytest.fixture(scope="session")
def six_build(builder: Builder) -> tuple[BuildResult, Log]:
    log = Log()
    return builder.build(pack(APPS / "build_six"), log), log


def _app(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "app"
    for name, text in files.items():
        _write(root / name, text)
    return root


def _manifests(store: ImageStore) -> set[str]:
    return {p.name for p in store.manifests_dir.iterdir()}


def _fails(builder: Builder, store: ImageStore, root: Path, **kw: Any) -> tuple[str, Log]:
    before = _manifests(store)
    log = Log()
    with pytest.raises(BuildError) as e:
        builder.build(pack(root), log, **kw)
    assert _manifests(store) == before
    return str(e.value), log


def _archive_of(layer: Path) -> dict[str, Any]:
    buf = io.BytesIO()
    found = write_archive(layer, buf)
    assert found.sha256 == sha256_hex(buf.getvalue()) and found.size == len(buf.getvalue())
    return found.to_json()


def test_build_without_dependencies(builder: Builder, store: ImageStore, uids: Uids) -> None:
    archive = pack(APPS / "build_hello")
    log = Log()
    result = builder.build(archive, log)
    m = result.manifest.model_dump()
    uid = uids("hello")
    layers = {"code": sha256_hex(archive), "deps": sha256_hex(f"\npython=3.11\nuid={uid}".encode())}
    assert m == {
        "schema": 1,
        "app": "hello",
        "entry": "app",
        "python": "3.11",
        "layers": layers,
        # Each layer's archive, as made again from its folder: equal trees, equal bytes.
        "layer_archives": {name: _archive_of(store.layer_path(layer)) for name, layer in layers.items()},
        "lock": "",
        "functions": {"greet": {"memory_mb": 256, "timeout_s": 30.0, "async": False}},
        "web": None,
        "volumes": {},
        "egress": [],
        "config": {},
    }
    # The bytes stored are the canonical JSON of those keys, exactly as before the manifest was a model.
    assert (store.manifests_dir / f"{result.image}.json").read_bytes() == canonical_json(m)
    assert (
        result.image == sha256_hex(canonical_json(m)) and store.get_manifest(result.image) == result.manifest
    )
    assert log.lines[-1] == f"==> Image sha256:{result.image}"
    assert f"==> Building hello (sandboxed, uid {uid})" in log.lines
    assert any(ln.startswith("==> Requirements: none") for ln in log.lines)
    code, deps = store.layer_path(m["layers"]["code"]), store.layer_path(m["layers"]["deps"])
    assert (code / "app.py").is_file() and list(deps.iterdir()) == []
    assert stat.S_IMODE(code.stat().st_mode) == 0o555  # read-only, and readable by a sandbox's uid
    assert stat.S_IMODE((code / "app.py").stat().st_mode) == 0o444

    # ?app= overrides the name in the code, and the build runs as that app.
    again = builder.build(archive, Log(), app_name="greeter")
    assert again.manifest.app == "greeter" and again.image != result.image
    assert again.manifest.layers.code == m["layers"]["code"]  # unpacking runs no app code: shared
    assert again.manifest.layers.deps != m["layers"]["deps"]
    assert builder.build(archive, Log()).image == result.image  # content-addressed: same input, same image


def test_build_with_requirements_txt(six_build: tuple[BuildResult, Log], store: ImageStore) -> None:
    result, log = six_build
    assert result.manifest.lock == SIX_LOCK
    assert set(result.manifest.functions) == {"six_1_16_0"}  # six was importable by inspect
    deps = store.layer_path(result.manifest.layers.deps)
    assert (deps / "six.py").is_file()
    assert "==> Requirements: requirements.txt" in log.lines
    assert any("six==1.16.0" in ln for ln in log.lines if not ln.startswith("==> "))  # uv output streamed
    assert "    egress to pypi.org:443" in log.lines  # through the build's egress proxy
    # Taken over by the image store: ours, read-only, whatever uid installed it.
    for path in [deps, *deps.rglob("*")]:
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (0, 0) and st.st_mode & 0o222 == 0, path


def test_code_only_change_reuses_dependencies(
    six_build: tuple[BuildResult, Log], builder: Builder, tmp_path: Path
) -> None:
    first, _ = six_build
    root = tmp_path / "six"
    shutil.copytree(APPS / "build_six", root)
    with (root / "app.py").open("a") as f:
        f.write("\n\n@app.function()\ndef extra(event, ctx):\n    return 1\n")
    log = Log()
    started = time.monotonic()
    result = builder.build(pack(root), log)
    elapsed = time.monotonic() - started
    assert result.deps_cached and elapsed < 10
    assert result.manifest.layers.deps == first.manifest.layers.deps
    assert result.manifest.layers.code != first.manifest.layers.code
    assert set(result.manifest.functions) == {"extra", "six_1_16_0"}
    assert "==> Resolving dependencies (cached)" in log.lines
    assert f"==> Dependencies: cached {result.manifest.layers.deps[:12]}" in log.lines


def test_apps_never_share_dependency_layers(
    six_build: tuple[BuildResult, Log], builder: Builder, store: ImageStore, uids: Uids, data_dir: Path
) -> None:
    # The same requirements: a layer ran its app's build code, so each app gets its own.
    first, _ = six_build
    archive = pack(APPS / "build_six")
    log = Log()
    other = builder.build(archive, log, app_name="six-other")
    assert other.manifest.lock == first.manifest.lock == SIX_LOCK
    assert other.manifest.layers.deps != first.manifest.layers.deps and not other.deps_cached
    assert "==> Resolving dependencies (1 requirement, Python 3.11)" in log.lines  # its own lock too
    assert (store.layer_path(other.manifest.layers.deps) / "six.py").is_file()
    for name in ("sixer", "six-other"):  # and each its own uv cache, which no other uid may enter
        cache = data_dir / "cache" / "uv" / str(uids(name))
        st = cache.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uids(name), 0o700) and any(cache.iterdir())
    # A redeploy of the app with unchanged requirements hits its own cache.
    log = Log()
    started = time.monotonic()
    again = builder.build(archive, log, app_name="six-other")
    assert again.deps_cached and time.monotonic() - started < 10
    assert again.manifest.layers.deps == other.manifest.layers.deps
    assert "==> Resolving dependencies (cached)" in log.lines


def test_pyproject_dependencies(builder: Builder, store: ImageStore) -> None:
    log = Log()
    result = builder.build(pack(APPS / "build_pyproject"), log)
    assert result.manifest.lock == SIX_LOCK and result.manifest.app == "pyproj"
    assert result.manifest.web is not None and result.manifest.web.kind == "asgi"
    assert "==> Requirements: pyproject.toml [project].dependencies" in log.lines
    assert any(ln.startswith("==> Requirements: dropping 'osless>=0.1'") for ln in log.lines)
    assert (store.layer_path(result.manifest.layers.deps) / "six.py").is_file()


def _spy(tmp_path: Path, targets: dict[str, Any]) -> Path:
    root = copy_app(APPS / "build_spy", tmp_path / "spy")
    (root / "vendor" / "spy" / "targets.json").write_text(json.dumps(targets))
    return root


def _spy_targets(data_dir: Path, *, api_port: int, forks: int) -> dict[str, Any]:
    return {
        "read": [str(data_dir / "admin-token"), str(data_dir / "state.db"), "/etc/shadow"],
        "list": [str(data_dir), str(data_dir / "images")],
        "write": ["/etc/spy", "/usr/spy"],
        # The API's port, and the index's own address, directly rather than through the egress proxy.
        "connect": [["127.0.0.1", api_port], [socket.gethostbyname("pypi.org"), 443]],
        "proxy": ["pypi.org", "example.com", "api.osless"],
        "forks": forks,
        "plant": str(data_dir / "victim"),
    }


def _check_spy(report: dict[str, Any], *, uid: int, data_dir: Path, api_port: int) -> None:
    """What a dependency's setup.py saw: its app's uid, no platform secret, the index only."""
    assert report["uid_map"] == ["0", str(uid), "1"] and report["getuid"] == 0
    assert report["read"] == {
        str(data_dir / "admin-token"): "ENOENT",
        str(data_dir / "state.db"): "ENOENT",
        "/etc/shadow": "ENOENT",
    }
    assert report["list"] == {str(data_dir): "ENOENT", str(data_dir / "images"): "ENOENT"}
    assert set(report["write"].values()) == {"EROFS"}
    pypi = socket.gethostbyname("pypi.org")
    assert report["connect"] == {f"127.0.0.1:{api_port}": "ECONNREFUSED", f"{pypi}:443": "ENETUNREACH"}
    assert report["resolve"] != "resolved"
    assert report["proxy"] == {"pypi.org": 200, "example.com": 403, "api.osless": 403}
    # Of the platform's environment, what uv needs and nothing else (no token, no credentials).
    leaked = set(report["env"]) & (set(os.environ) | {"OSLESS_CONFIG_DIR"})
    assert leaked <= {"PATH", "LANG", "LC_ALL", "TZ", "HOME", "SSL_CERT_FILE", "SSL_CERT_DIR"}, leaked


def test_dependency_build_code_runs_sandboxed_as_the_app(
    builder: Builder, store: ImageStore, uids: Uids, data_dir: Path, tmp_path: Path
) -> None:
    # What the platform keeps: the admin token, the state. The spy's setup.py runs, as any sdist's
    # does, when uv asks it for its metadata (resolving) and builds its wheel (installing).
    (data_dir / "admin-token").write_text("osl_secret\n")
    (data_dir / "state.db").write_text("state")
    victim = data_dir / "victim"  # where the link it leaves in its layer points
    victim.write_text("mine")
    os.chown(victim, 12345, 12345)
    victim.chmod(0o640)
    api_port = 7070
    root = _spy(tmp_path, _spy_targets(data_dir, api_port=api_port, forks=BUILD_NPROC + 500))
    log = Log()
    result = builder.build(pack(root), log)
    uid = uids("spy")
    deps = store.layer_path(result.manifest.layers.deps)
    report = json.loads((deps / "spy_report.py").read_text().split("REPORT = ", 1)[1].split("\n")[0][1:-1])
    _check_spy(report, uid=uid, data_dir=data_dir, api_port=api_port)
    # A fork bomb stalls at the sandbox's process cap (its own count: uv's threads are part of it).
    assert report["nproc"] == [BUILD_NPROC, BUILD_NPROC]
    assert report["forks"]["stopped"] == "EAGAIN" and 0 < report["forks"]["count"] < BUILD_NPROC
    # The app's import ran as its uid too; the lock names the copy of ./vendor/spy the steps saw.
    assert f"imported_as_{uid}" in result.manifest.functions
    assert result.manifest.lock == "/build/src/vendor/spy\n"
    # What it left in the layer was taken over without following it: the link's target untouched.
    assert report["plant"] == "planted"
    st = victim.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (12345, 0o640)
    # A link leading out of the layer goes: a node would refuse the layer's archive with it.
    assert not (deps / "planted-link").is_symlink()
    assert not (deps / "planted-fifo").exists() and not (deps / "planted-fifo").is_symlink()
    suid = (deps / "planted-suid").lstat()
    assert (suid.st_uid, stat.S_IMODE(suid.st_mode)) == (0, 0o555)


def test_local_packages_are_never_served_from_the_lock_cache(
    builder: Builder, store: ImageStore, data_dir: Path, tmp_path: Path
) -> None:
    # The same requirements text, other code: the lock and the layer must follow the code.
    digests = []
    for n, forks in enumerate((0, 1)):
        root = _spy(tmp_path / str(n), _spy_targets(data_dir, api_port=7070, forks=forks))
        log = Log()
        result = builder.build(pack(root), log)
        assert "==> Resolving dependencies (1 requirement, Python 3.11)" in log.lines
        deps = store.layer_path(result.manifest.layers.deps)
        assert f'"count": {forks}' in (deps / "spy_report.py").read_text()
        digests.append(result.manifest.layers.deps)
    assert digests[0] != digests[1]


def _processes_of(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid:
                pids.append(int(entry.name))
    return pids


def test_stop_all_builds_kills_a_stuck_setup_py(builder: Builder, store: ImageStore, uids: Uids) -> None:
    errors: list[BaseException] = []

    def build() -> None:
        try:
            builder.build(pack(APPS / "build_hang"), Log())
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=build)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(store.tmp_dir.glob("build-*/tmp/hang-started")):
        assert time.monotonic() < deadline and thread.is_alive(), errors
        time.sleep(0.1)
    uid = uids("hang")
    assert _processes_of(uid)  # the setup.py, as the app's uid on the host
    started = time.monotonic()
    stop_all_builds()
    thread.join(30)
    assert not thread.is_alive() and time.monotonic() - started < 10
    assert len(errors) == 1 and isinstance(errors[0], BuildError)
    assert "Resolving dependencies failed" in str(errors[0])
    deadline = time.monotonic() + 5
    while _processes_of(uid):  # the whole sandbox went, whatever left the process group
        assert time.monotonic() < deadline, _processes_of(uid)
        time.sleep(0.05)
    assert not list(store.tmp_dir.glob("build-*"))


def _victim_digest() -> str:
    """Another app's code layer, named as an attacker would: the sha256 of its (deterministic) upload."""
    return sha256_hex(pack(APPS / "build_six"))


REFUSED = [
    ("spy @ file:///etc/passwd", "points outside the app's source"),
    ("file:///etc", "points outside the app's source"),
    ("/etc/passwd", "points outside the app's source"),
    ("../{victim}", "points outside the app's source"),
    ("./../{victim}/requirements.txt", "points outside the app's source"),
    ("spy @ file:../{victim}", "points outside the app's source"),
    ("git+https://github.com/benjaminp/six", "is a VCS URL"),
    ("six @ git+https://github.com/benjaminp/six@1.16.0", "is a VCS URL"),
    ("six @ https://files.pythonhosted.org/packages/six-1.16.0.tar.gz", "is a URL"),
    ("https://example.com/six-1.16.0-py2.py3-none-any.whl", "is a URL"),
    ("six-1.16.0.tar.gz", "is not in the uploaded source"),
    ("spy @ file://otherhost/x", "names a file on another host"),
    ("six==${HOME}", "environment variables"),
]


@pytest.mark.parametrize("source", ["requirements.txt", "pyproject.toml"])
@pytest.mark.parametrize(("requirement", "message"), REFUSED, ids=[r for r, _ in REFUSED])
def test_url_and_path_requirements_are_refused(
    source: str,
    requirement: str,
    message: str,
    builder: Builder,
    store: ImageStore,
    six_build: tuple[BuildResult, Log],
    tmp_path: Path,
) -> None:
    first, _ = six_build
    victim = _victim_digest()
    assert first.manifest.layers.code == victim and store.has_layer(victim)  # it is there to be read
    requirement = requirement.replace("{victim}", victim)
    files = {"app.py": "import osless\napp = osless.App('attacker')\n"}
    if source == "requirements.txt":
        files["requirements.txt"] = f"six==1.16.0\n{requirement}\n"
        where = "requirements.txt line 2"
    else:
        files["pyproject.toml"] = (
            f"[project]\nname = 'a'\nversion = '1'\ndependencies = ['six', {requirement!r}]\n"
        )
        where = f"pyproject.toml dependency {requirement!r}"
    text, log = _fails(builder, store, _app(tmp_path, files))
    assert text.startswith(f"{where}: ") and message in text, text
    assert not any(ln.startswith("==> Resolving") for ln in log.lines)  # refused before uv ever ran


def test_tool_uv_settings_are_ignored(builder: Builder, tmp_path: Path) -> None:
    pyproject = """[project]
name = "a"
version = "1"
dependencies = ["six==1.16.0"]

[tool.uv.sources]
six = { git = "https://github.com/benjaminp/six" }

[[tool.uv.index]]
url = "https://example.com/simple"
default = true
"""
    files = {"app.py": "import six\nimport osless\napp = osless.App('uvcfg')\n", "pyproject.toml": pyproject}
    files["uv.toml"] = 'index-url = "https://example.com/simple"\n'
    log = Log()
    result = builder.build(pack(_app(tmp_path, files)), log)
    assert result.manifest.lock == SIX_LOCK  # from the platform's index, not the app's
    assert any(ln.startswith("==> pyproject.toml [tool.uv] is ignored") for ln in log.lines)
    assert any(ln.startswith("==> uv.toml is ignored") for ln in log.lines)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("import osless\nNAME = 'x'\napp = osless.App(NAME)\n", "Could not read the app's name from app.py"),
        ("from shop import app\n", "Could not read the app's name from app.py"),
        (
            "import osless\na = osless.App('one')\nb = osless.App('two')\n",
            "app.py names several apps ('one', 'two')",
        ),
        ("import osless\napp = osless.App('Not_Valid')\n", "invalid app name 'Not_Valid'"),
        ("import osless\ndef broken(:\n", "app.py line 2: SyntaxError"),
    ],
    ids=["variable", "imported", "several", "invalid", "syntax"],
)
def test_app_name_must_be_readable_before_the_build(
    code: str, message: str, builder: Builder, store: ImageStore, tmp_path: Path
) -> None:
    text, log = _fails(builder, store, _app(tmp_path, {"app.py": code, "requirements.txt": "six\n"}))
    assert message in text, text
    if "SyntaxError" not in message and "invalid" not in message:
        assert 'pass --name NAME to osless deploy, or write App("name") with a literal name' in text
    assert not any(ln.startswith("==> Building") for ln in log.lines)  # refused before anything ran


def test_name_given_on_deploy_needs_no_literal(builder: Builder, tmp_path: Path) -> None:
    root = _app(tmp_path, {"app.py": "import osless\nNAME = 'named'\napp = osless.App(NAME)\n"})
    assert builder.build(pack(root), Log(), app_name="named").manifest.app == "named"


def test_app_whose_name_changes_at_import_fails_the_build(
    builder: Builder, store: ImageStore, tmp_path: Path
) -> None:
    code = "from osless import App as _App\n\ndef App(name):\n    return _App('other')\n\napp = App('shop')\n"
    text, _ = _fails(builder, store, _app(tmp_path, {"app.py": code}))
    assert "The app's name is 'other' once imported, but the build read App('shop')" in text
    assert "--name other" in text


def test_unsandboxed_builder_builds(store: ImageStore, tmp_path: Path) -> None:
    # `osless up --no-sandbox`: the same steps on the host, uv's cache shared by the apps.
    log = Log()
    result = Builder(store).build(pack(APPS / "build_six"), log)
    assert result.manifest.lock == SIX_LOCK and "==> Building sixer" in log.lines
    assert (store.layer_path(result.manifest.layers.deps) / "six.py").is_file()
    assert result.manifest.layers.deps == sha256_hex(f"{SIX_LOCK}\npython=3.11".encode())


def test_import_error_fails_the_build(builder: Builder, store: ImageStore, tmp_path: Path) -> None:
    code = "import osless\napp = osless.App('boom')\nraise RuntimeError('boom-xyz')\n"
    root = _app(tmp_path, {"app.py": code})
    message, log = _fails(builder, store, root)
    assert "RuntimeError: boom-xyz" in message and "Traceback" in log.text


def test_syntax_error_fails_the_build(builder: Builder, store: ImageStore, tmp_path: Path) -> None:
    message, _ = _fails(builder, store, _app(tmp_path, {"app.py": "import osless\ndef broken(:\n"}))
    assert "SyntaxError" in message
    # With the name given, the import itself says so.
    root = _app(tmp_path / "named", {"app.py": "import osless\ndef broken(:\n"})
    message, _ = _fails(builder, store, root, app_name="broken")
    assert "SyntaxError" in message and "Importing the app" in message


def test_missing_entry_fails_the_build(builder: Builder, store: ImageStore, tmp_path: Path) -> None:
    message, _ = _fails(builder, store, _app(tmp_path, {"readme.md": "no code"}))
    assert "app.py" in message


def test_unknown_package_fails_the_build(builder: Builder, store: ImageStore, tmp_path: Path) -> None:
    files = {"app.py": "import osless\napp = osless.App('x')\n"}
    files["requirements.txt"] = "osless-no-such-package-zzz\n"
    message, _ = _fails(builder, store, _app(tmp_path, files))
    assert "osless-no-such-package-zzz" in message and "Resolving dependencies failed" in message


@pytest.mark.parametrize("line", ["-r other.txt", "-e ./lib", "--index-url https://example.invalid"])
def test_requirement_options_are_refused(
    line: str, builder: Builder, store: ImageStore, tmp_path: Path
) -> None:
    files = {"app.py": "import osless\napp = osless.App('x')\n", "requirements.txt": f"six\n{line}\n"}
    message, _ = _fails(builder, store, _app(tmp_path, files))
    assert f"line 2: {line!r} is not supported" in message


def test_per_requirement_options_other_than_hash_are_refused(
    builder: Builder, store: ImageStore, tmp_path: Path
) -> None:
    files = {
        "app.py": "import osless\napp = osless.App('x')\n",
        "requirements.txt": "six --config-settings x=y\n",
    }
    message, _ = _fails(builder, store, _app(tmp_path, files))
    assert message.startswith("requirements.txt line 1: '--config-settings x=y' is not supported")


def test_unsafe_archive_fails_the_build(builder: Builder, store: ImageStore) -> None:
    before = _manifests(store)
    with pytest.raises(BuildError, match=r"source archive was refused.*outside"):
        builder.build(_tar(("../x", b"x", "file")), Log())
    assert _manifests(store) == before


def test_a_manifest_past_its_limit_fails_the_build_saying_what_is_too_big(
    builder: Builder, store: ImageStore, tmp_path: Path
) -> None:
    # A release record carries the manifest, and store values stop at 1 MiB: builds keep it far below.
    code = (
        "import osless\napp = osless.App('many')\n"
        "for i in range(4000):\n"
        "    app.function(name=f'a_function_with_a_rather_long_name_{i:05d}')(lambda event, ctx: None)\n"
    )
    message, _ = _fails(builder, store, _app(tmp_path, {"app.py": code}))
    assert f"past the limit of {MAX_MANIFEST_BYTES // 1024} KiB (largest parts: functions" in message
    assert message.startswith("The app's manifest is too large") and "Declare fewer functions" in message
    with pytest.raises(ManifestTooLarge, match="largest parts: lock 300 KiB, "):
        store.put_manifest(ImageManifest.model_validate(manifest_fields(lock="x" * 300 * 1024)))


def test_log_lines_are_streamed_as_they_come(builder: Builder, tmp_path: Path) -> None:
    # The app writes a line, then sleeps at import: the line must reach the log before the build ends.
    seen: list[float] = []

    def log(line: str) -> None:
        if line == "importing":
            seen.append(time.monotonic())

    code = "import sys, time, osless\nprint('importing', file=sys.stderr, flush=True)\ntime.sleep(0.6)\n"
    builder.build(pack(_app(tmp_path, {"app.py": code + "app = osless.App('slow')\n"})), log)
    assert len(seen) == 1 and time.monotonic() - seen[0] > 0.5


def test_manifest_is_json_serialisable(six_build: tuple[BuildResult, Log], store: ImageStore) -> None:
    result, _ = six_build
    assert (
        json.loads((store.manifests_dir / f"{result.image}.json").read_bytes())
        == result.manifest.model_dump()
    )


# -- end to end: the build of a deploy on a running platform ----------------------------------------


def test_deploy_builds_dependencies_sandboxed_as_the_app(platform: Platform, tmp_path: Path) -> None:
    root = _spy(tmp_path, _spy_targets(platform.data_dir, api_port=platform.api_port, forks=0))
    out = platform.deploy(root)
    assert out["app"] == "spy"
    uid = platform.http("GET", "/v1/apps/spy").json()["uid"]
    status, report = platform.invoke("spy", "report")
    assert status == 200, report
    _check_spy(report, uid=uid, data_dir=platform.data_dir, api_port=platform.api_port)
    status, imported_as = platform.invoke("spy", f"imported_as_{uid}")
    assert (status, imported_as) == (200, str(uid))


def test_deploy_refuses_url_requirements(platform: Platform, tmp_path: Path) -> None:
    files = {"app.py": "import osless\napp = osless.App('urlreq')\n", "requirements.txt": "file:///etc\n"}
    r = platform.cli("deploy", str(_app(tmp_path, files)), check=False)
    assert r.returncode != 0
    assert "requirements.txt line 1: 'file:///etc' points outside the app's source" in r.stdout + r.stderr


def test_deploy_needs_a_readable_name(platform: Platform, tmp_path: Path) -> None:
    files = {"app.py": "import osless\nNAME = 'dyn'\napp = osless.App(NAME)\n"}
    root = _app(tmp_path, files)
    r = platform.cli("deploy", str(root), check=False)
    assert r.returncode != 0 and "pass --name NAME" in r.stdout + r.stderr
    assert platform.deploy(root, "--name", "dyn")["app"] == "dyn"


def test_a_missing_module_names_the_package_and_where_it_goes(tmp_path: Path) -> None:
    from osless.builder.hints import missing_module, relative

    code, deps = tmp_path / "layers" / "c0de", tmp_path / "layers" / "d3p5"
    code.mkdir(parents=True)
    tb = [
        "Traceback (most recent call last):",
        f'  File "{code}/pkg/util.py", line 3, in <module>',
        "    import PIL.Image",
        "ModuleNotFoundError: No module named 'PIL'",
    ]
    assert missing_module(tb, code) == (
        "pkg/util.py imports PIL, which is not installed: create a requirements.txt next to the app "
        "that lists Pillow (the package that provides PIL), then deploy again."
    )
    (code / "requirements.txt").write_text("six\n")
    assert "add Pillow (the package that provides PIL) to requirements.txt" in str(missing_module(tb, code))
    (code / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert "to [project].dependencies in pyproject.toml" in str(missing_module(tb, code))
    assert missing_module([*tb[:-1], "ValueError: no"], code) is None
    assert relative(tb[1], code, deps) == '  File "pkg/util.py", line 3, in <module>'
    assert relative(f"{deps}/x.py" + "y" * 10_000, code, deps).startswith("site-packages/x.py")
    assert len(relative("z" * 10_000, code, deps)) <= 2000


# -- build steps: App(build=[...]) -------------------------------------------------------------------


def test_build_steps_write_into_the_code_layer_only(builder: Builder, store: ImageStore) -> None:
    archive = pack(APPS / "build_steps")
    log = Log()
    result = builder.build(archive, log)
    code = store.layer_path(result.manifest.layers.code)
    # The commands' output is a layer of its own; the unpacked source stays as uploaded.
    assert result.manifest.layers.code != sha256_hex(archive)
    assert not (store.layer_path(sha256_hex(archive)) / "greeting.json").exists()
    assert json.loads((code / "greeting.json").read_text()) == {
        "word": "hello",
        "six": "1.16.0",
        "cwd_is_code": True,
        "writable": {"code": True, "deps": False, "root": False, "usr": False, "tmp": True},
    }
    assert stat.S_IMODE((code / "greeting.json").stat().st_mode) == 0o444  # sealed like any layer
    assert not (code / "probe").exists()
    assert result.manifest.model_dump()["layer_archives"]["code"] == _archive_of(code)
    steps = log.lines.index("==> Build step 1/2: python make_greeting.py hello")
    assert log.lines[steps + 1] == "    building stepper with six 1.16.0"  # streamed into the log
    assert "==> Build step 2/2: test -s greeting.json" in log.lines
    again = Log()
    assert builder.build(archive, again).image == result.image
    assert f"==> Build steps: cached {result.manifest.layers.code[:12]}" in again.lines


def test_a_failing_build_step_fails_the_build_naming_it(
    builder: Builder, store: ImageStore, tmp_path: Path
) -> None:
    files = {
        "app.py": "import osless\napp = osless.App('badstep', build=['echo one', 'echo said >&2; exit 3'])\n",
    }
    error, log = _fails(builder, store, _app(tmp_path, files))
    assert error.startswith("The build step 'echo said >&2; exit 3' failed with exit code 3:")
    assert "said" in error and "said" in log.lines and "    one" in log.lines
    # A build step importing what the app did not declare (the platform has it) is told what to add.
    files = {"app.py": "import osless\napp = osless.App('badstep', build=['python -c \"import yaml\"'])\n"}
    error, _ = _fails(builder, store, _app(tmp_path / "yaml", files))
    assert "failed with exit code 1: the app imports yaml, which is not installed" in error
    assert "create a requirements.txt next to the app that lists PyYAML" in error


def test_deploy_runs_the_build_steps_and_a_failing_one_keeps_the_old_release(
    platform: Platform, tmp_path: Path
) -> None:
    platform.deploy(APPS / "build_steps")
    status, text = platform.invoke("stepper", "greeting")
    assert status == 200 and json.loads(text)["word"] == "hello", text
    broken = copy_app(APPS / "build_steps", tmp_path / "broken")
    app_py = broken / "app.py"
    app_py.write_text(app_py.read_text().replace('"test -s greeting.json"', '"exit 7"'))
    r = platform.cli("deploy", str(broken), check=False)
    assert r.returncode != 0
    assert "The build step 'exit 7' failed with exit code 7" in r.stdout + r.stderr
    status, text = platform.invoke("stepper", "greeting")  # the release before still serves
    assert status == 200 and json.loads(text)["word"] == "hello", text
