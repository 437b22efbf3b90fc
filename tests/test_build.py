"""The build part: source archives, the image store and the builder (real uv, real subprocesses)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path

import pytest

from osless.build import (
    Builder,
    BuildError,
    BuildResult,
    ImageNotFoundError,
    ImageStore,
    SourceError,
    canonical_json,
    pack,
    sha256_hex,
    unpack,
)

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

    manifest = {"schema": 1, "b": [1, 2], "a": "é"}
    image = store.put_manifest(manifest)
    assert image == sha256_hex(b'{"a":"\\u00e9","b":[1,2],"schema":1}')
    assert image == sha256_hex(canonical_json(manifest))
    assert store.get_manifest(image) == manifest and store.has_manifest(image)
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


# -- builder --------------------------------------------------------------------------------------


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    # One store for the whole session, so that later builds hit the lock and layer caches.
    return ImageStore(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def builder(store: ImageStore) -> Builder:
    return Builder(store)


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


def _fails(builder: Builder, store: ImageStore, root: Path) -> tuple[str, Log]:
    before = _manifests(store)
    log = Log()
    with pytest.raises(BuildError) as e:
        builder.build(pack(root), log)
    assert _manifests(store) == before
    return str(e.value), log


def test_build_without_dependencies(builder: Builder, store: ImageStore) -> None:
    archive = pack(APPS / "build_hello")
    log = Log()
    result = builder.build(archive, log)
    m = result.manifest
    assert m == {
        "schema": 1,
        "app": "hello",
        "entry": "app",
        "python": "3.11",
        "layers": {"code": sha256_hex(archive), "deps": sha256_hex(b"\npython=3.11")},
        "lock": "",
        "functions": {"greet": {"memory_mb": 256, "timeout_s": 30.0, "async": False}},
        "web": None,
        "volumes": {},
        "egress": [],
        "config": {},
    }
    assert result.image == sha256_hex(canonical_json(m)) and store.get_manifest(result.image) == m
    assert log.lines[-1] == f"==> Image sha256:{result.image}"
    assert any(ln.startswith("==> Requirements: none") for ln in log.lines)
    code, deps = store.layer_path(m["layers"]["code"]), store.layer_path(m["layers"]["deps"])
    assert (code / "app.py").is_file() and list(deps.iterdir()) == []
    assert stat.S_IMODE(code.stat().st_mode) == 0o555  # read-only, and readable by a sandbox's uid
    assert stat.S_IMODE((code / "app.py").stat().st_mode) == 0o444

    again = builder.build(archive, Log(), app_name="greeter")
    assert again.deps_cached and again.manifest["app"] == "greeter" and again.image != result.image
    assert builder.build(archive, Log()).image == result.image  # content-addressed: same input, same image


def test_build_with_requirements_txt(six_build: tuple[BuildResult, Log], store: ImageStore) -> None:
    result, log = six_build
    assert result.manifest["lock"] == SIX_LOCK
    assert set(result.manifest["functions"]) == {"six_1_16_0"}  # six was importable by inspect
    deps = store.layer_path(result.manifest["layers"]["deps"])
    assert (deps / "six.py").is_file()
    assert "==> Requirements: requirements.txt" in log.lines
    assert any("six==1.16.0" in ln for ln in log.lines if not ln.startswith("==> "))  # uv output streamed


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
    assert result.manifest["layers"]["deps"] == first.manifest["layers"]["deps"]
    assert result.manifest["layers"]["code"] != first.manifest["layers"]["code"]
    assert set(result.manifest["functions"]) == {"extra", "six_1_16_0"}
    assert "==> Resolving dependencies (cached)" in log.lines
    assert f"==> Dependencies: cached {result.manifest['layers']['deps'][:12]}" in log.lines


def test_pyproject_dependencies(builder: Builder, store: ImageStore) -> None:
    log = Log()
    result = builder.build(pack(APPS / "build_pyproject"), log)
    assert result.manifest["lock"] == SIX_LOCK and result.manifest["app"] == "pyproj"
    assert result.manifest["web"]["kind"] == "asgi"
    assert "==> Requirements: pyproject.toml [project].dependencies" in log.lines
    assert any(ln.startswith("==> Requirements: dropping 'osless>=0.1'") for ln in log.lines)
    assert (store.layer_path(result.manifest["layers"]["deps"]) / "six.py").is_file()


def test_import_error_fails_the_build(builder: Builder, store: ImageStore, tmp_path: Path) -> None:
    code = "import osless\napp = osless.App('boom')\nraise RuntimeError('boom-xyz')\n"
    root = _app(tmp_path, {"app.py": code})
    message, log = _fails(builder, store, root)
    assert "RuntimeError: boom-xyz" in message and "Traceback" in log.text


def test_syntax_error_fails_the_build(builder: Builder, store: ImageStore, tmp_path: Path) -> None:
    message, _ = _fails(builder, store, _app(tmp_path, {"app.py": "import osless\ndef broken(:\n"}))
    assert "SyntaxError" in message


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


def test_unsafe_archive_fails_the_build(builder: Builder, store: ImageStore) -> None:
    before = _manifests(store)
    with pytest.raises(BuildError, match=r"source archive was refused.*outside"):
        builder.build(_tar(("../x", b"x", "file")), Log())
    assert _manifests(store) == before


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
    assert json.loads((store.manifests_dir / f"{result.image}.json").read_bytes()) == result.manifest
