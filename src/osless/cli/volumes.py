"""`osless volumes ls|put|get|rm`: an app's volumes and their files, through the API."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, fail, print_json, table, when
from osless.errors import ApiError

if TYPE_CHECKING:
    from osless.client import Api

__all__ = ["volumes_app"]

volumes_app = typer.Typer(
    rich_markup_mode=None, help="An app's volumes: list them and their files, put, get and remove files."
)
AppArg = Annotated[str, typer.Argument(metavar="APP")]
VolumeArg = Annotated[str, typer.Argument(metavar="VOLUME")]
NodeOpt = Annotated[
    str | None, typer.Option("--node", help="The node whose copy to use, when several nodes hold the volume.")
]
CHUNK = 1024 * 1024
# What a terminal acts on rather than shows (escape sequences, bidirectional overrides).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _files(app: str, volume: str, path: str) -> str:
    return f"/v1/apps/{app}/volumes/{volume}/files/{quote(path.strip('/'), safe='/')}"


def _shown(name: str) -> str:
    """A name the app chose, as a table cell: its control characters written out (`\\x1b`), never
    sent to the terminal, and its brackets never read as markup."""
    return escape(_CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), name))


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


@volumes_app.command("ls")
def ls(
    app_name: AppArg,
    where: Annotated[str | None, typer.Argument(metavar="[VOLUME[/PATH]]")] = None,
    node: NodeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The app's volumes (name, mount path, size, used, nodes); or the files under VOLUME/PATH."""
    api = client()
    if where is None:
        got = call(api.get, f"/v1/apps/{app_name}/volumes")
        if json_out:
            print_json(got)
            return
        rows = []
        for v in got["items"]:
            held = v["nodes"] or [{"node": "-", "size_bytes": None, "used_bytes": None}]
            for h in held:
                size = h["size_bytes"] if h["size_bytes"] is not None else (v["size_mb"] or 0) * 1024 * 1024
                rows.append([v["name"], v["path"] or "-", _size(size), _size(h["used_bytes"]), h["node"]])
        table(["VOLUME", "MOUNTED AT", "SIZE", "USED", "NODE"], rows)
        if got["unreachable"]:
            console.print(
                f"nodes that did not answer (their copies are not listed): {', '.join(got['unreachable'])}"
            )
        return
    volume, _, path = where.partition("/")
    got = call(
        api.request,
        "GET",
        f"/v1/apps/{app_name}/volumes/{volume}/entries",
        params={"path": path, "node": node},
    )
    if json_out:
        print_json(got)
        return
    table(
        ["NAME", "TYPE", "SIZE", "MODIFIED"],
        [
            [
                _shown(e["name"]) + ("/" if e["type"] == "folder" else ""),
                e["type"],
                _size(e["size"]),
                when(e["mtime"]),
            ]
            for e in got["items"]
        ],
    )
    if got["truncated"]:
        console.print(f"only the first {got['limit']} entries are shown: list a folder inside to see more")


@volumes_app.command("put")
def put(
    app_name: AppArg,
    volume: VolumeArg,
    local: Annotated[Path, typer.Argument(metavar="LOCAL", help="A file, or a folder (uploaded whole).")],
    remote: Annotated[
        str | None,
        typer.Argument(metavar="[REMOTE_PATH]", help="Where in the volume (ending in /: into that folder)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace files that exist.")] = False,
    node: NodeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload a file (or a folder, recursively) into a volume; refuses to replace a file without --force."""
    if not local.exists():
        fail(f"{local} does not exist")
    target = (remote or "").strip("/") if remote and not remote.endswith("/") else None
    if target is None:
        target = f"{(remote or '').strip('/')}/{local.name}".strip("/")
    uploads: list[tuple[Path, str]] = []
    skipped: list[str] = []
    if local.is_dir():
        for top, dirs, names in os.walk(local):  # links are not followed, nor uploaded: said below
            dirs.sort()
            for name in sorted(names):
                path = Path(top) / name
                rel = path.relative_to(local).as_posix()
                (
                    uploads.append((path, f"{target}/{rel}"))
                    if path.is_file() and not path.is_symlink()
                    else skipped.append(rel)
                )
            for d in [d for d in dirs if (Path(top) / d).is_symlink()]:
                skipped.append((Path(top) / d).relative_to(local).as_posix())
                dirs.remove(d)
    elif local.is_file():
        uploads.append((local, target))
    else:
        fail(f"{local} is neither a file nor a folder")
    api = client()
    done = []
    for path, dest in uploads:
        done.append(_upload(api, app_name, volume, path, dest, force=force, node=node))
        if not json_out:
            console.print(f"{path} -> {volume}/{dest} ({_size(done[-1]['size'])})", markup=False)
    if json_out:
        print_json({"uploaded": done, "skipped": skipped})
    elif skipped:
        console.print(f"skipped (not regular files): {', '.join(skipped[:20])}", markup=False)


def _upload(api: Api, app: str, volume: str, path: Path, dest: str, *, force: bool, node: str | None) -> Any:
    with open(path, "rb") as f:
        length = os.fstat(f.fileno()).st_size
        try:
            with api.raw(
                "PUT",
                _files(app, volume, dest),
                params={"force": force, "node": node},
                body=f,
                headers={"content-length": str(length), "content-type": "application/octet-stream"},
            ) as resp:
                return json.loads(resp.read(64 * 1024))
        except ApiError as e:
            fail(f"{volume}/{dest}: {e.message}", e.code)


@volumes_app.command("get")
def get(
    app_name: AppArg,
    volume: VolumeArg,
    remote: Annotated[str, typer.Argument(metavar="REMOTE_PATH")],
    local: Annotated[
        str | None, typer.Argument(metavar="[LOCAL]", help="A file or folder; - for stdout.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a local file that exists.")] = False,
    node: NodeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a file of a volume (to LOCAL, a folder, or - for stdout)."""
    api = client()
    name = remote.strip("/").rsplit("/", 1)[-1]
    if not name:
        fail("name a file of the volume: `osless volumes ls APP VOLUME` lists them")
    to_stdout = local == "-"
    dest = Path(local or name)
    if not to_stdout and dest.is_dir():
        dest = dest / name
    if not to_stdout and dest.exists() and not force:
        fail(f"{dest} exists: pass --force to replace it")
    try:
        with api.raw("GET", _files(app_name, volume, remote), params={"node": node}) as resp:
            if to_stdout:
                shutil.copyfileobj(resp, sys.stdout.buffer, CHUNK)
                sys.stdout.buffer.flush()
                return
            tmp = dest.with_name(f".{dest.name}.osless-get")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out, CHUNK)
            expected = resp.headers.get("x-osless-size", "")
    except ApiError as e:
        fail(e.message, e.code)
    size = tmp.stat().st_size
    if expected.isdigit() and int(expected) != size:
        tmp.unlink()
        fail(f"{volume}/{remote} changed while it was read ({size} of {expected} bytes): get it again")
    tmp.replace(dest)
    if json_out:
        print_json({"path": str(dest), "size": size})
    else:
        console.print(f"{volume}/{remote.strip('/')} -> {dest} ({_size(size)})", markup=False)


@volumes_app.command("rm")
def rm(
    app_name: AppArg,
    volume: VolumeArg,
    path: Annotated[str, typer.Argument(metavar="PATH")],
    recursive: Annotated[
        bool, typer.Option("-r", "--recursive", help="Remove a folder and its files.")
    ] = False,
    node: NodeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove a file, link or (with -r) folder of a volume."""
    api = client()
    call(api.request, "DELETE", _files(app_name, volume, path), params={"recursive": recursive, "node": node})
    if json_out:
        print_json({"removed": f"{volume}/{path.strip('/')}"})
    else:
        console.print(f"removed {volume}/{path.strip('/')}", markup=False)
