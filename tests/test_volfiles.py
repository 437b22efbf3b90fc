"""The node's file work in a volume (`node.volfiles`) on real ext4 images (`node.volumes`): a volume
not mounted (its app at zero) opened and left behind nothing, what an upload replaces, what a
download and a listing refuse or bound. The whole path through the API is in tests/test_volumes.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from osless.node import volfiles
from osless.node.volfiles import FileError, Writer
from osless.node.volumes import Volumes, mounts, unavailable_reason
from osless.sdk.app import Volume

UID = 64123


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volumes]:
    why = unavailable_reason()
    if why is not None:
        pytest.skip(f"sized volumes need: {why}")
    base = tmp_path_factory.mktemp("volfiles")
    v = Volumes(base / "data", base / "run", images=True, warn=lambda app, message: None)
    asyncio.run(v.attach("files", UID, {"/data": Volume("files-data", size_mb=16)}))
    try:
        yield v
    finally:
        asyncio.run(v.delete("files", lambda: False))


@contextlib.contextmanager
def root(volumes: Volumes) -> Iterator[int]:
    fd, uid = asyncio.run(volumes.open_root("files", "files-data", UID))
    assert uid == UID
    try:
        yield fd
    finally:
        os.close(fd)


def loop_files() -> set[str]:
    found = set()
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            found.add(backing.read_text().strip())
    return found


def write(fd: int, path: str, data: bytes, *, force: bool = False) -> None:
    w = Writer.start(fd, volfiles.parts(path), UID, force=force)
    try:
        w.write(data)
        w.commit(force=force)
    finally:
        w.close()


def test_a_volume_not_mounted_is_opened_and_leaves_no_mount_behind(volumes: Volumes) -> None:
    asyncio.run(volumes.detach("files", lambda: False))  # the app at zero here
    image = str(volumes.root / "files" / "files-data.img")
    assert image not in loop_files()
    with root(volumes) as fd:
        write(fd, "a/b.txt", b"while at zero")
        # Mounted aside, and already out of the mount table: only the descriptor holds it.
        assert not [p for p in mounts() if p.startswith(str(volumes.points.parent))]
        assert volfiles.entries(fd, ["a"])[0][0]["name"] == "b.txt"
    assert image not in loop_files()  # its loop device went with the descriptor
    held = asyncio.run(volumes.held("files", UID))
    assert [(v["name"], v["mounted"]) for v in held] == [("files-data", False)]
    assert 12 * 2**20 < held[0]["size_bytes"] <= 16 * 2**20 and held[0]["used_bytes"] > 0
    # The app starting again finds what was written, as its own.
    point = Path(
        asyncio.run(volumes.attach("files", UID, {"/data": Volume("files-data", size_mb=16)}))["/data"]
    )
    assert (point / "a" / "b.txt").read_bytes() == b"while at zero"
    assert (point / "a").stat().st_uid == UID and (point / "a" / "b.txt").stat().st_uid == UID


def test_a_volume_is_opened_only_for_the_app_whose_uid_owns_it(volumes: Volumes) -> None:
    # Another uid: a new app of the same name, while the deleted one's volumes are still here.
    with pytest.raises(FileNotFoundError):
        asyncio.run(volumes.open_root("files", "files-data", UID + 1))
    assert asyncio.run(volumes.held("files", UID + 1)) == []
    assert [v["name"] for v in asyncio.run(volumes.held("files", UID))] == ["files-data"]


def test_a_forced_upload_replaces_the_name_never_the_bytes_of_a_hard_link(volumes: Volumes) -> None:
    with root(volumes) as fd:
        write(fd, "linked", b"original")
        os.link("linked", "other-name", src_dir_fd=fd, dst_dir_fd=fd)
        with pytest.raises(FileError) as e:
            Writer.start(fd, ["linked"], UID, force=False)  # before a byte of the upload is read
        assert e.value.code == "exists"
        write(fd, "linked", b"new", force=True)
        file, size = volfiles.reader(fd, ["linked"], 2**30)
        assert b"".join(volfiles.read_chunks(file, size)) == b"new"
        os.close(file)
        file, size = volfiles.reader(fd, ["other-name"], 2**30)
        assert b"".join(volfiles.read_chunks(file, size)) == b"original"
        os.close(file)
        assert not [n for n in os.listdir(fd) if n.startswith(".osless-upload-")]


def test_a_sparse_file_past_the_volume_s_size_is_refused(volumes: Volumes) -> None:
    with root(volumes) as fd:
        big = os.open("sparse", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.ftruncate(big, 2**40)  # a terabyte of holes in a 16 MB volume
        os.close(big)
        with pytest.raises(FileError) as e:
            volfiles.reader(fd, ["sparse"], os.fstatvfs(fd).f_blocks * os.fstatvfs(fd).f_frsize)
        assert e.value.code == "too_large"
        volfiles.remove(fd, ["sparse"], recursive=False)


def test_a_listing_is_bounded_and_says_so(volumes: Volumes) -> None:
    with root(volumes) as fd:
        for i in range(12):
            write(fd, f"many/f{i:02}", b"x")
        found, more = volfiles.entries(fd, ["many"], limit=5)
        assert len(found) == 5 and more
        assert volfiles.entries(fd, ["many"], limit=50) == (
            sorted(volfiles.entries(fd, ["many"], limit=50)[0], key=lambda e: str(e["name"])),
            False,
        )
        volfiles.remove(fd, ["many"], recursive=True)
        with pytest.raises(FileError) as e:
            volfiles.entries(fd, ["many"])
        assert e.value.code == "not_found"


def test_a_folder_swapped_for_a_link_is_not_followed_by_a_recursive_remove(
    volumes: Volumes, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("host file")
    with root(volumes) as fd:
        write(fd, "tree/inner/file", b"x")
        volfiles.remove(fd, ["tree", "inner"], recursive=True)
        tree = os.open("tree", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.symlink(str(outside), "inner", dir_fd=tree)
        os.close(tree)
        volfiles.remove(fd, ["tree"], recursive=True)  # the link goes, never what it names
        with pytest.raises(FileError):
            volfiles.entries(fd, ["tree"])
    assert (outside / "keep").read_text() == "host file"


def test_a_recursive_remove_of_folders_nested_without_end_holds_few_descriptors(volumes: Volumes) -> None:
    # Each level below holds a descriptor: the app's 1000 nested folders took the node's process to
    # its limit (1024 where a service manager leaves the default), failing whatever else it opened.
    with root(volumes) as fd:
        cur = os.dup(fd)
        for _ in range(1000):
            os.mkdir("d", dir_fd=cur)
            inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=cur)
            os.close(cur)
            cur = inner
        os.close(cur)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 300, hard))
        try:
            with pytest.raises(FileError) as e:
                volfiles.remove(fd, ["d"], recursive=True)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert e.value.code == "too_deep" and "remove its inner folders first" in e.value.message
        for depth in range(900, -1, -100):  # from deep enough, it goes
            volfiles.remove(fd, ["d"] * (depth + 1), recursive=True)


def test_a_plain_folder_volume_is_reached_the_same_way(tmp_path: Path) -> None:
    plain = Volumes(tmp_path / "data", tmp_path / "run", images=False, warn=lambda app, message: None)
    asyncio.run(plain.attach("files", UID, {"/data": Volume("files-data")}))
    assert asyncio.run(plain.held("files", UID)) == [
        {"name": "files-data", "size_bytes": None, "used_bytes": None, "mounted": False}
    ]
    fd, uid = asyncio.run(plain.open_root("files", "files-data", UID))
    assert uid == UID
    try:
        write(fd, "note", b"in a folder")
        os.symlink("/etc", "etc", dir_fd=fd)
        with pytest.raises(FileError) as e:
            volfiles.entries(fd, ["etc", "hostname"])
        assert e.value.code == "link_refused"
    finally:
        os.close(fd)
    note = tmp_path / "data" / "volumes" / "files" / "files-data" / "note"
    assert note.read_bytes() == b"in a folder" and note.stat().st_uid == UID
    with pytest.raises(FileNotFoundError):
        asyncio.run(plain.open_root("files", "other", UID))
