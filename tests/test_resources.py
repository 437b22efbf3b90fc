"""The API's view of the store (`api.resources`): what holds while records change at once, on a real
SQLite store."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from osless.api.errors import ApiError
from osless.api.models import ConfigChange, ConfigState
from osless.api.resources import Resources, put_of_app, release_key
from osless.api.usage import add_usage
from osless.contracts import App, AppStatus, ImageManifest, Instance, Release
from osless.images import sha256_hex
from osless.store import Conflict, SQLiteStore
from tests.test_images import manifest_fields

IMAGE = sha256_hex(b"image")
T = TypeVar("T")


async def _release(res: Resources, app: str) -> None:
    await res.create_app(App(name=app))
    release = Release(
        app=app, version=1, image=IMAGE, description="", manifest=ImageManifest(**manifest_fields(app=app))
    )
    await res.store.put(release_key(app, 1), release.model_dump_json().encode())


async def later(step: Awaitable[T]) -> T:
    """`step` after a few milliseconds or none: in some rounds before the delete, in some after."""
    await asyncio.sleep(random.choice((0, 0, 0.001, 0.003, 0.006)))
    return await step


def test_nothing_made_as_an_app_is_deleted_outlives_it(tmp_path: Path) -> None:
    """Controllers and nodes write an app's records while people delete it: an instance the scheduler
    places, the autoscaler's status, a node's minute of usage. Whatever the order, none is left after
    the delete, for a new app of the name to inherit (an instance would run as it)."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            res = Resources(store)
            hour = int(time.time() // 3600 * 3600)
            for n in range(100):
                await _release(res, "a")

                def scaled(app: App, status: AppStatus) -> AppStatus:
                    status.desired = 1
                    return status

                made = await asyncio.gather(
                    *(
                        later(
                            res.create_instance(
                                Instance(id=f"i{n}x{k}", app="a", release=1, image=IMAGE, node="n1")
                            )
                        )
                        for k in range(3)
                    ),
                    later(res.update_app_status("a", scaled)),
                    later(
                        add_usage(store, [{"hour": hour, "app": "a", "function": "f", "invocations": 1.0}])
                    ),
                    later(res.delete_app("a")),
                    return_exceptions=True,
                )
                for outcome in made[:4]:  # made before the delete (and gone with it), or refused
                    if isinstance(outcome, BaseException):
                        assert isinstance(outcome, ApiError) and outcome.code == "app_not_found", outcome
                assert made[-1] is None
                assert (await res.list_instances(app="a"))[0] == []
                left, _ = await store.list("/")
                assert [kv.key for kv in left if "/a/" in kv.key or kv.key.endswith("/a")] == [], n

    asyncio.run(main())


def test_a_record_of_an_app_is_written_only_while_the_app_stands(tmp_path: Path) -> None:
    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            with pytest.raises(ApiError) as info:
                await put_of_app(store, "a", [("/appstatus/a", b"{}", 0)])
            assert info.value.code == "app_not_found" and await store.get("/appstatus/a") is None
            await store.put("/apps/a", b"{}")
            await put_of_app(store, "a", [("/appstatus/a", b"{}", 0)])
            kv = await store.get("/appstatus/a")
            assert kv is not None
            # A record that exists is checked by its own revision: the app's delete took it.
            await store.txn(deletes=[("/apps/a", None), ("/appstatus/a", None)])
            with pytest.raises(Conflict):
                await put_of_app(store, "a", [("/appstatus/a", b"{}", kv.mod_revision)])
            assert await store.get("/appstatus/a") is None

    asyncio.run(main())


def test_a_config_written_as_its_app_is_deleted_is_refused(tmp_path: Path) -> None:
    """`PATCH /config` reads the app (its schema) and the config, then commits: an app deleted in
    between must not get its first config (secrets) back, for a new app of the name to run with."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            res = Resources(store)
            await _release(res, "a")
            for first in (True, False):
                cfg, rev = await res.get_config("a")  # as the route reads it, the app standing
                assert rev == 0 if first else rev > 0
                new = ConfigState(app="a", version=cfg.version + 1, values={"k": {"$secret": "x"}})
                change = ConfigChange(
                    app="a", version=new.version, by=None, description="set k", changes={}, values={}
                )
                if first:
                    await res.commit_config(new, rev, change)
                    continue
                await res.delete_app("a")
                with pytest.raises(Conflict):  # the config read is gone with the app
                    await res.commit_config(new, rev, change)
                with pytest.raises(ApiError) as info:  # as the route tries again, reading none
                    await res.commit_config(new, 0, change)
                assert info.value.code == "app_not_found"
            left, _ = await store.list("/")
            assert [kv.key for kv in left if "/a/" in kv.key or kv.key.endswith("/a")] == []

    asyncio.run(main())


def test_a_config_is_committed_while_its_app_changes(tmp_path: Path) -> None:
    """The app's record changing (a deploy, a restart) is no reason to refuse its first config."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            res = Resources(store)
            await _release(res, "a")

            def bump(app: App) -> App:
                app.restart += 1
                return app

            new = ConfigState(app="a", version=1, values={"k": 1})
            change = ConfigChange(app="a", version=1, by=None, description="set k", changes={}, values={})
            await asyncio.gather(
                res.commit_config(new, 0, change), *(res.update_app("a", bump) for _ in range(10))
            )
            assert (await res.get_config("a"))[0].values == {"k": 1}

    asyncio.run(main())


def test_a_rollback_of_an_app_deleted_meanwhile_brings_nothing_back(tmp_path: Path) -> None:
    """The rollback route reads the app and its releases, then commits: only a deploy makes an app."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            res = Resources(store)
            await _release(res, "a")
            await res.delete_app("a")

            def make(version: int) -> Release:
                manifest = ImageManifest(**manifest_fields(app="a"))
                return Release(app="a", version=version, image=IMAGE, description="", manifest=manifest)

            with pytest.raises(ApiError) as info:
                await res.commit_release("a", make)
            assert info.value.code == "app_not_found"
            assert await store.get("/apps/a") is None and (await store.list("/releases/a/"))[0] == []

    asyncio.run(main())


def test_an_app_made_as_its_namesake_is_deleted_has_a_uid_of_its_own(tmp_path: Path) -> None:
    """`create_app` reads the name's uid record, then writes the app: the old app's uid, read just
    before its delete, must not become the new app's (its volumes and idempotency keys are the old
    app's). Whatever the order, the app that stands has the uid its record names, never the old."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            res = Resources(store)
            took = 0.001
            for n in range(200):
                await res.create_app(App(name="a"))
                old = await res.app_uid("a")

                async def delete() -> None:
                    nonlocal took
                    began = time.perf_counter()
                    await res.delete_app("a")
                    took = time.perf_counter() - began

                async def create() -> App:  # at any point of the delete, its commit included
                    await asyncio.sleep(random.uniform(0, took))
                    return await res.create_app(App(name="a"))

                made = await asyncio.gather(delete(), create(), return_exceptions=True)
                for outcome in made:
                    if isinstance(outcome, BaseException):
                        assert isinstance(outcome, ApiError) and outcome.code == "app_exists", outcome
                got = await res.get_app_rev("a")
                if got is not None:
                    assert got[0].uid == await res.app_uid("a") != old, n
                    await res.delete_app("a")

    asyncio.run(main())
