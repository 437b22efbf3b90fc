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
                await put_of_app(store, "a", "/appstatus/a", b"{}", 0)
            assert info.value.code == "app_not_found" and await store.get("/appstatus/a") is None
            await store.put("/apps/a", b"{}")
            await put_of_app(store, "a", "/appstatus/a", b"{}", 0)
            kv = await store.get("/appstatus/a")
            assert kv is not None
            # A record that exists is checked by its own revision: the app's delete took it.
            await store.txn(deletes=[("/apps/a", None), ("/appstatus/a", None)])
            with pytest.raises(Conflict):
                await put_of_app(store, "a", "/appstatus/a", b"{}", kv.mod_revision)
            assert await store.get("/appstatus/a") is None

    asyncio.run(main())
