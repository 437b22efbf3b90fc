"""Upgrades: what an earlier release left in a data dir, brought to what this code reads, once, at start.

Each step brings the data dir from `version - 1` to `version`, in two parts:
- `store`: reads records through the `Store` interface (so it works on any backend) and returns what
  to write; the runner writes that and the new version (`/meta/schema`) in one transaction, each put
  checked against the revision it was read at. A kill -9 leaves all of it or none. What the part does
  before returning (allocating uids) is idempotent: the next start finds it done and goes on.
- `files`: changes files in the data dir, idempotently; the data dir's own version (`schema.json`)
  moves on only after it, so one cut off runs again at the next start.

Version 1 is every release before versions were recorded (eeff47b and earlier): a store with records
and no `/meta/schema`. A new store starts at the latest. A store or data dir newer than this code is
refused: downgrades are not supported. Before the store is migrated, `backup(version)` copies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from osless import __version__
from osless.api.models import App, AppStatus, Instance, now
from osless.api.resources import Resources
from osless.store import Conflict, Store

__all__ = [
    "KEEP_BACKUPS",
    "LATEST",
    "SCHEMA_FILE",
    "SCHEMA_KEY",
    "STEPS",
    "MigrationError",
    "Paths",
    "Plan",
    "Step",
    "backup_sqlite",
    "migrate",
]

log = logging.getLogger("osless.migrations")

SCHEMA_KEY = "/meta/schema"  # {"version", "at", "by"}
SCHEMA_FILE = "schema.json"  # in the data dir: the version its files were brought to
KEEP_BACKUPS = 3
ATTEMPTS = 20  # a store step that lost a race (another server migrating the same store) reads again
PROGRESS_EVERY = 1000  # records: a long migration says now and then that it is still going


class MigrationError(Exception):
    """The data dir cannot be used by this code as it is; the message says why and what to do."""


@dataclass(frozen=True)
class Paths:
    """The folders a files part may change."""

    data_dir: Path
    run_dir: Path


@dataclass
class Plan:
    """What a store part writes: (key, value, if_revision) puts and (key, if_revision) deletes."""

    puts: list[tuple[str, bytes, int | None]] = field(default_factory=list)
    deletes: list[tuple[str, int | None]] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    version: int  # what it brings the data dir to
    summary: str
    store: Callable[[Resources], Awaitable[Plan]] | None = None
    files: Callable[[Resources, Paths], Awaitable[None]] | None = None


# -- version 2: from eeff47b, where apps had no uid of record ------------------------------------


async def _uids_to_records(res: Resources) -> Plan:
    """Each app gets a uid of its own (`Resources.app_uid`): eeff47b derived one from the name and
    recorded it nowhere, so two apps could share one. The App records and their instances carry it
    (the agent runs no instance without one). Instances are pending again: their processes went with
    the release that ran them. An instance of an app that is gone is deleted: nothing of it may run.
    """
    apps, _ = await res.store.list("/apps/")
    log.warning("schema 2: a uid for each of %d apps", len(apps))
    uids: dict[str, int] = {}
    for n, kv in enumerate(apps, 1):
        name = kv.key.removeprefix("/apps/")
        uids[name] = await res.app_uid(name)
        if n % PROGRESS_EVERY == 0:
            log.warning("schema 2: uids for %d of %d apps", n, len(apps))
    plan = Plan()
    for kv in apps:
        try:
            App.model_validate_json(kv.value)
        except ValidationError as e:
            raise MigrationError(f"the record {kv.key} cannot be read: {e}") from None
        # The record as it is, uid set: what later steps move out of it (its status) must stay in it.
        raw = json.loads(kv.value)
        uid = uids[kv.key.removeprefix("/apps/")]
        if raw.get("uid") != uid:
            raw["uid"] = uid
            plan.puts.append((kv.key, json.dumps(raw).encode(), kv.mod_revision))
    instances, _ = await res.store.list("/instances/")
    for kv in instances:
        value = _instance(kv.value, uids)
        if value is None:
            plan.deletes.append((kv.key, kv.mod_revision))
        elif value != kv.value:
            plan.puts.append((kv.key, value, kv.mod_revision))
    log.warning("schema 2: writing %d records in one transaction", len(plan.puts) + len(plan.deletes))
    return plan


def _instance(value: bytes, uids: dict[str, int]) -> bytes | None:
    """The instance record as this code stores it, or None if it must go (app gone, or unreadable)."""
    try:
        raw = json.loads(value)
        uid = uids.get(raw["app"])
        if uid is None:
            return None
        if raw.get("uid") == uid:
            return value
        old = raw.get("status") or {}
        raw["uid"] = uid
        raw["status"] = {
            "phase": "pending",
            "restarts": old.get("restarts", 0),
            "last_exit": old.get("last_exit"),
            "message": "upgraded: waiting for its node to start it",
            "updated_at": now(),
        }
        try:
            return Instance.model_validate_json(json.dumps(raw)).model_dump_json().encode()
        except ValidationError:
            raw["status"]["last_exit"] = None  # history only: not worth losing the instance for
            return Instance.model_validate_json(json.dumps(raw)).model_dump_json().encode()
    except (ValueError, LookupError, TypeError, AttributeError):  # pydantic's errors are ValueErrors
        log.warning("schema 2: an unreadable instance record is deleted (the scheduler makes another)")
        return None


async def _files_to_uids(res: Resources, paths: Paths) -> None:
    items, _ = await res.store.list("/appuids/")
    uids = {kv.key.removeprefix("/appuids/"): int(json.loads(kv.value)["uid"]) for kv in items}
    await asyncio.to_thread(_files_to_uids_sync, paths, uids)


def _files_to_uids_sync(paths: Paths, uids: dict[str, int]) -> None:
    """Plain-folder volumes (hosts without the volume tools) change hands to the app's new uid (those
    the agent moves into an image change as they move); eeff47b's shared lock files and its socket
    folders, named by the old uids, go: nothing reads them now."""
    volumes = paths.data_dir / "volumes"
    if os.geteuid() == 0 and volumes.is_dir():
        for folder in volumes.iterdir():
            uid = uids.get(folder.name)
            # `.owner`: this code's layout, already its app's; no uid: the agent deletes the app's volumes.
            if uid is None or folder.is_symlink() or not folder.is_dir() or (folder / ".owner").exists():
                continue
            for volume in folder.iterdir():
                if volume.is_dir() and not volume.is_symlink():
                    # -R without -L never follows a link the app left; nothing of the app runs yet.
                    subprocess.run(
                        ["chown", "-R", "--no-dereference", f"{uid}:{uid}", str(volume)],
                        check=True,
                        capture_output=True,
                        timeout=600,
                    )
    for lock in (paths.data_dir / "images" / "locks").glob("*.txt"):
        if lock.is_file() and not lock.is_symlink():
            lock.unlink(missing_ok=True)
    shutil.rmtree(paths.run_dir / "a", ignore_errors=True)


# -- version 3: the app's status apart from its spec ------------------------------------------------

STATUS_FIELDS = ("desired", "scale_reason", "woken_at")  # what schema 2 kept in the App record


async def _status_apart(res: Resources) -> Plan:
    """What the controllers wrote into the App record (`desired`, `scale_reason`, `woken_at`) moves to
    `/appstatus/{app}`, so that their writes no longer conflict with people's nor bump the spec."""
    apps, _ = await res.store.list("/apps/")
    log.warning("schema 3: the status of %d apps apart from their spec", len(apps))
    plan = Plan()
    for kv in apps:
        name = kv.key.removeprefix("/apps/")
        try:
            raw = json.loads(kv.value)
            status = AppStatus(app=name, **{k: raw[k] for k in STATUS_FIELDS if k in raw})
            spec = App.model_validate({k: v for k, v in raw.items() if k not in STATUS_FIELDS})
        except (ValueError, TypeError, AttributeError) as e:  # pydantic's errors are ValueErrors
            raise MigrationError(f"the record {kv.key} cannot be read: {e}") from None
        plan.puts.append((kv.key, spec.model_dump_json().encode(), kv.mod_revision))
        # Unchecked: a status left by an app of that name deleted since is replaced.
        plan.puts.append((f"/appstatus/{name}", status.model_dump_json().encode(), None))
    return plan


STEPS: tuple[Step, ...] = (
    Step(2, "a uid of record for every app and instance", store=_uids_to_records, files=_files_to_uids),
    Step(3, "the status of each app apart from its spec", store=_status_apart),
)
LATEST = STEPS[-1].version if STEPS else 1


# -- the runner -----------------------------------------------------------------------------------


async def migrate(store: Store, paths: Paths, *, backup: Callable[[int], Path] | None = None) -> int:
    """Bring the store and the data dir to the latest version; returns it. Call before anything else
    reads the store. `backup(version)` copies the store first, when it has something to migrate."""
    res = Resources(store)
    kv = await store.get(SCHEMA_KEY)
    fresh = kv is None and not await _has_records(store)
    stored = LATEST if fresh else _version(kv.value if kv is not None else None, SCHEMA_KEY)
    file = paths.data_dir / SCHEMA_FILE
    on_disk = _version(file.read_bytes(), str(file)) if file.exists() else (LATEST if fresh else 1)
    if max(stored, on_disk) > LATEST:
        where = "store" if stored > LATEST else str(file)
        raise MigrationError(
            f"this data dir was written by a newer osless (the {where} is at schema version "
            f"{max(stored, on_disk)}; this osless {__version__} knows up to {LATEST}): downgrades are not "
            f"supported; run the newer release, or restore a backup made before the upgrade "
            f"({paths.data_dir}/*.backup)"
        )
    if fresh:
        await _bump(store, LATEST, 0)
        _write_version(file, LATEST)
        return LATEST
    if stored == LATEST and on_disk == LATEST:
        return LATEST
    copy = await asyncio.to_thread(backup, stored) if backup is not None and stored < LATEST else None
    log.warning(
        "upgrading the data dir from schema %d to %d%s",
        min(stored, on_disk),
        LATEST,
        f"; its state was copied to {copy} first" if copy else "",
    )
    for step in STEPS:
        ran = False
        if stored < step.version:
            stored = await _run_store(res, step)
            ran = True
        if step.files is not None and (ran or on_disk < step.version):
            try:
                await step.files(res, paths)
            except (OSError, subprocess.SubprocessError) as e:
                raise MigrationError(
                    f"schema {step.version} ({step.summary}): the data dir's files could not be changed "
                    f"({e}); fix that and start again: this part runs again, the store is migrated already"
                ) from e
        if on_disk < step.version:
            _write_version(file, step.version)
            on_disk = step.version
    log.warning("the data dir is at schema %d", LATEST)
    return LATEST


async def _run_store(res: Resources, step: Step) -> int:
    """The step's store part and the version bump in one transaction; the version now stored."""
    for _ in range(ATTEMPTS):
        kv = await res.store.get(SCHEMA_KEY)
        stored = _version(kv.value if kv is not None else None, SCHEMA_KEY)
        if stored >= step.version:
            return stored  # another server did it meanwhile
        plan = await step.store(res) if step.store is not None else Plan()
        try:
            await res.store.txn(
                puts=[*plan.puts, (SCHEMA_KEY, _schema_record(step.version), kv.mod_revision if kv else 0)],
                deletes=plan.deletes,
            )
            return step.version
        except Conflict:
            continue
    raise MigrationError(f"schema {step.version} ({step.summary}): the store kept changing; start again")


async def _has_records(store: Store) -> bool:
    # Every data dir that was ever started holds tokens (the admin's); one with apps is surely used.
    return any([(await store.list("/tokens/"))[0], (await store.list("/apps/"))[0]])


async def _bump(store: Store, version: int, if_revision: int) -> None:
    with contextlib.suppress(Conflict):  # another server recorded it first
        await store.put(SCHEMA_KEY, _schema_record(version), if_revision=if_revision)


def _schema_record(version: int) -> bytes:
    return json.dumps({"version": version, "at": now(), "by": __version__}).encode()


def _version(value: bytes | None, where: str) -> int:
    if value is None:
        return 1
    try:
        version = json.loads(value)["version"]
    except (ValueError, KeyError, TypeError):
        raise MigrationError(f"{where} holds no schema version; restore it from a backup") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MigrationError(
            f"{where} holds the schema version {str(version)[:20]!r}; restore it from a backup"
        )
    return version


def _write_version(file: Path, version: int) -> None:
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": version, "at": now(), "by": __version__}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)
    _fsync_dir(file.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_sqlite(db: Path, version: int, *, keep: int = KEEP_BACKUPS) -> Path:
    """An online copy of the SQLite store `db` (sqlite3's backup API: consistent while it is open),
    next to it as `<name>.v<version>-<UTC time>.backup`; only the newest `keep` backups stay."""
    at = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"
    dest = db.with_name(f"{db.name}.v{version}-{stamp}.backup")
    tmp = dest.with_name(dest.name + ".tmp")
    for stale in db.parent.glob(f"{db.name}.v*.backup.tmp"):  # a copy cut off by a crash
        stale.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
        finally:
            target.close()
    finally:
        source.close()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dest)  # whole or absent: a backup is never a half copy
    _fsync_dir(db.parent)
    copies = sorted(db.parent.glob(f"{db.name}.v*.backup"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[keep:]:
        old.unlink(missing_ok=True)
    return dest
