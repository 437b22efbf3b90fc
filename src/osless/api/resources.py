"""Typed access to the resources in the store: keys, encoding, compare-and-swap updates."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pydantic import BaseModel

from osless.api.buildlog import LOG_PREFIX
from osless.api.errors import ApiError
from osless.api.models import (
    App,
    AppStatus,
    ConfigChange,
    ConfigState,
    Deploy,
    Instance,
    Leader,
    Node,
    Release,
    now,
)
from osless.store import Conflict, KeyValue, LeaseNotFound, Store

__all__ = ["KINDS", "Resources", "app_not_found", "put_of_app"]

M = TypeVar("M", bound=BaseModel)

# kind -> (key prefix, model); the watch streams serve these prefixes.
KINDS: dict[str, tuple[str, type[BaseModel]]] = {
    "apps": ("/apps/", App),
    "appstatus": ("/appstatus/", AppStatus),
    "releases": ("/releases/", Release),
    "deploys": ("/deploys/", Deploy),
    "instances": ("/instances/", Instance),
    "nodes": ("/nodes/", Node),
    "leaders": ("/leaders/", Leader),
    "config_values": ("/config/", ConfigState),  # for node agents only: see routes/config.py
}


# App uids: each app gets a host uid of its own, that no other app and no host user has. Claims are
# never given back (a uid is never reused), so the range is wide: a billion apps created and deleted
# before random picks start to miss.
UID_BASE, UID_RANGE = 1_000_000, 1_000_000_000


# Builder processes each hold a key here on their lease (the token that registered it in its value),
# named by the deploys they claimed.
BUILDERS = "/builders/"

# `/placed/{app}/{node}`: the app was placed on the node (its volumes may be there), until it is deleted.
PLACED_PREFIX = "/placed/"


# `/usage/{app}/{hour}`: an hour of the app's usage (`api.usage`), until it is deleted.
USAGE_PREFIX = "/usage/"


def app_not_found(name: str) -> ApiError:
    return ApiError(404, "app_not_found", f"app {name!r} does not exist; `osless apps` lists the apps")


async def put_of_app(store: Store, app: str, puts: list[tuple[str, bytes, int | None]]) -> None:
    """Write records that go with app `app` (`Resources.delete_app` deletes them), in one
    transaction, only while the app stands: made just after the app's delete (a controller's, a
    node's or a person's write in flight), they would belong to the next app of the name. If one of
    them exists (its `if_revision` a revision), its own check is enough, since the delete took it.
    404 `app_not_found`; `Conflict` on the records' own checks (read them again). The app's record
    changing meanwhile (a deploy, a restart) is read again here."""
    if any(rev for _, _, rev in puts):
        await store.txn_put_many(puts)
        return
    for _ in range(20):
        spec = await store.get(f"/apps/{app}")
        if spec is None:
            raise app_not_found(app)
        try:
            await store.txn(puts=puts, checks=[(spec.key, spec.mod_revision)])
            return
        except Conflict as e:
            if e.key != spec.key:
                raise
    raise ApiError(409, "conflict", f"app {app!r} is changing too often; try again")


def _uid_of(kv: KeyValue) -> int:
    return int(json.loads(kv.value)["uid"])


def _enc(obj: BaseModel) -> bytes:
    return obj.model_dump_json().encode()


def release_key(app: str, version: int) -> str:
    return f"/releases/{app}/{version:08d}"


class Resources:
    """The API's view of the store. Nothing else in the platform reads or writes state."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def _get(self, key: str, model: type[M]) -> tuple[M, int] | None:
        kv = await self.store.get(key)
        if kv is None:
            return None
        return model.model_validate_json(kv.value), kv.mod_revision

    async def _list(self, prefix: str, model: type[M]) -> tuple[list[M], int]:
        items, rev = await self.store.list(prefix)
        return [model.model_validate_json(kv.value) for kv in items], rev

    async def update(
        self, key: str, model: type[M], change: Callable[[M], M | None], attempts: int = 20
    ) -> M:
        """Read-modify-write with compare-and-swap, retried on a concurrent change."""
        for _ in range(attempts):
            got = await self._get(key, model)
            if got is None:
                raise ApiError(404, "not_found", f"{key.strip('/').replace('/', ' ')} does not exist")
            obj, rev = got
            new = change(obj.model_copy(deep=True))
            if new is None:
                return obj
            try:
                await self.store.put(key, _enc(new), if_revision=rev)
                return new
            except Conflict:
                continue
        raise ApiError(409, "conflict", f"{key} is changing too often; try again")

    # apps
    async def get_app(self, name: str) -> App:
        got = await self._get(f"/apps/{name}", App)
        if got is None:
            raise app_not_found(name)
        return got[0]

    async def get_app_rev(self, name: str) -> tuple[App, int] | None:
        return await self._get(f"/apps/{name}", App)

    async def app_uid(self, name: str) -> int:
        """The app's host uid, allocated on first use: unique, and never handed out again.

        `/uids/{uid}` claims a uid (kept after the app is deleted, so it is never reused while
        anything of the old app may remain); `/appuids/{app}` says which one is the app's.
        """
        return _uid_of(await self._uid_record(name))

    async def _uid_record(self, name: str) -> KeyValue:
        """`/appuids/{name}` as read (allocated if there is none): a write of a new app checks it, so
        that the uid of an earlier app of the name, read just before that app's delete took the
        record, never becomes the new one's (its volumes, its idempotency keys)."""
        for _ in range(50):
            kv = await self.store.get(f"/appuids/{name}")
            if kv is not None:
                return kv
            uid = UID_BASE + secrets.randbelow(UID_RANGE)
            claim = json.dumps({"owner": name, "at": now()}).encode()
            # Read again either way: the record's revision is what the app's write checks. A
            # Conflict: the uid was taken, or another request allocated the app's.
            with contextlib.suppress(Conflict):
                await self.store.txn_put_many(
                    [
                        (f"/uids/{uid}", claim, 0),
                        (f"/appuids/{name}", json.dumps({"uid": uid}).encode(), 0),
                    ]
                )
        raise ApiError(503, "uid_exhausted", "could not allocate a uid for the app; try again")

    async def create_app(self, app: App) -> App:
        for _ in range(20):
            uid = await self._uid_record(app.name)
            app.uid = _uid_of(uid)
            try:
                # A fresh status with it: nothing an earlier app of that name was told carries over.
                await self.store.txn(
                    puts=[
                        (f"/apps/{app.name}", _enc(app), 0),
                        (f"/appstatus/{app.name}", _enc(AppStatus(app=app.name)), None),
                    ],
                    checks=[(uid.key, uid.mod_revision)],
                )
                return app
            except Conflict as e:
                if e.key != uid.key:
                    raise ApiError(409, "app_exists", f"app {app.name!r} already exists") from e
        raise ApiError(409, "conflict", f"app {app.name!r} is changing too often; try again")

    async def list_apps(self) -> tuple[list[App], int]:
        return await self._list("/apps/", App)

    async def update_app(self, name: str, change: Callable[[App], App | None]) -> App:
        await self.get_app(name)
        return await self.update(f"/apps/{name}", App, change)

    async def get_app_status(self, name: str) -> tuple[AppStatus, int]:
        """The app's status and its store revision (0: no controller has said anything yet)."""
        got = await self._get(f"/appstatus/{name}", AppStatus)
        return got if got is not None else (AppStatus(app=name), 0)

    async def list_app_statuses(self) -> tuple[list[AppStatus], int]:
        return await self._list("/appstatus/", AppStatus)

    async def update_app_status(
        self, name: str, change: Callable[[App, AppStatus], AppStatus | None]
    ) -> AppStatus:
        """Compare-and-swap on the status alone: the spec (and its revision) is never written, so the
        controllers' writes and people's never conflict. `change` sees the spec as read."""
        for _ in range(20):
            app = await self.get_app(name)
            status, rev = await self.get_app_status(name)
            new = change(app, status.model_copy(deep=True))
            if new is None:
                return status
            new.updated_at = now()
            try:
                await put_of_app(self.store, name, [(f"/appstatus/{name}", _enc(new), rev)])
                return new
            except Conflict:
                continue
        raise ApiError(409, "conflict", f"the status of app {name!r} is changing too often; try again")

    async def delete_app(self, name: str) -> None:
        """The app and every record of it (releases, config and its history, instances, deploys)
        in one transaction, so that a crash never leaves half an app. The node agents stop its
        instances when they see them go."""
        for _ in range(20):
            got = await self._get(f"/apps/{name}", App)
            if got is None:
                raise app_not_found(name)
            _, rev = got
            deploys = [d for d in (await self.list_deploys())[0] if d.app == name]
            if building := [d.id for d in deploys if d.status in ("queued", "building")]:
                # Its release would bring the app back the moment it is committed.
                raise ApiError(
                    409,
                    "deploy_in_progress",
                    f"app {name!r} has a deploy building ({', '.join(building)}); "
                    "delete the app once it has finished",
                )
            # Read before its instances, and checked: each instance made for it rewrites it
            # (`create_instance`), so one made after the listing means list again.
            uid = await self.store.get(f"/appuids/{name}")
            records = [f"/instances/{i.id}" for i in (await self.list_instances(app=name))[0]]
            records += [f"/deploys/{d.id}" for d in deploys]
            # Its grants on other apps' functions (`/grants/{callee}/{fn}/{name}`): a new app of the
            # name must not inherit them. Its own, as the callee, go with the prefix below.
            records += [
                kv.key
                for kv in (await self.store.list("/grants/"))[0]
                if kv.key.rsplit("/", 1)[1] == name and not kv.key.startswith(f"/grants/{name}/")
            ]
            token_deletes, token_puts = await self._tokens_of(name)
            records += token_deletes
            try:
                # Checked against the app as read: a release committed meanwhile means read again.
                await self.store.txn(
                    puts=token_puts,
                    deletes=[
                        (f"/apps/{name}", rev),
                        (f"/config/{name}", None),
                        (f"/appstatus/{name}", None),
                        # The uid's claim in /uids/ stays: a new app of the same name gets a new uid.
                        (f"/appuids/{name}", uid.mod_revision if uid else 0),
                        *((k, None) for k in records),
                    ],
                    delete_prefixes=[
                        f"/releases/{name}/",
                        f"/confighistory/{name}/",
                        f"/grants/{name}/",  # who may call it: a new app of the name starts with none
                        f"/schedules/{name}/",  # paused or not, runs: a new app of the name has its own
                        f"{PLACED_PREFIX}{name}/",  # where it ran: a new app of the name ran nowhere
                        f"{USAGE_PREFIX}{name}/",  # what it used: a new app of the name has used nothing
                        *(f"{LOG_PREFIX}{d.id}/" for d in deploys),
                    ],
                )
                return
            except Conflict:
                continue
        raise ApiError(409, "conflict", f"app {name!r} is changing too often; try again")

    async def _tokens_of(self, name: str) -> tuple[list[str], list[tuple[str, bytes, int | None]]]:
        """What deleting app `name` does to the tokens made for it, so that none reaches a new app of
        the name: (tokens to delete, rewritten tokens). A token limited to the app goes; one limited
        to functions loses the app's (and goes if none is left)."""
        deletes: list[str] = []
        puts: list[tuple[str, bytes, int | None]] = []
        for kv in (await self.store.list("/tokens/"))[0]:
            try:
                record = json.loads(kv.value)
                functions = record.get("functions")
                scoped = record.get("app") == name
            except (ValueError, AttributeError):
                continue  # not a record this code reads: the guard refuses it too
            kept = None if functions is None else [f for f in functions if not str(f).startswith(f"{name}.")]
            if scoped or (kept is not None and not kept):
                deletes.append(kv.key)
            elif kept is not None and len(kept) != len(functions):
                puts.append((kv.key, json.dumps({**record, "functions": kept}).encode(), kv.mod_revision))
        return deletes, puts

    async def commit_release(
        self, app_name: str, make: Callable[[int], Release], deploy: Deploy | None = None
    ) -> tuple[App, Release]:
        """Create the app's next release and make it current in one transaction, which also
        records the `deploy` that made it as succeeded: a crash can never leave one without the other."""
        for _ in range(20):
            got = await self._get(f"/apps/{app_name}", App)
            checks: list[tuple[str, int]] = []
            if got is None and deploy is None:  # a rollback of an app deleted since it was read
                raise app_not_found(app_name)
            if got is None:
                uid = await self._uid_record(app_name)
                app, rev = App(name=app_name, uid=_uid_of(uid)), 0
                status, status_rev = AppStatus(app=app_name), None  # whatever an earlier app left
                checks.append((uid.key, uid.mod_revision))
            else:
                app, rev = got
                status, status_rev = await self.get_app_status(app_name)
            release = make(app.latest_release + 1)
            app.latest_release = release.version
            app.current_release = release.version
            app.current_image = release.image
            app.updated_at = now()
            # A new release starts with one instance warm (Knative's initial scale); the autoscaler
            # takes it from there, down to zero after the idle window if nothing comes.
            status.desired = max(status.desired or 0, 1, app.min)
            status.scale_reason = f"release v{release.version}"
            status.updated_at = now()
            puts: list[tuple[str, bytes, int | None]] = [
                (f"/apps/{app_name}", _enc(app), rev),
                (f"/appstatus/{app_name}", _enc(status), status_rev),
                (release_key(app_name, release.version), _enc(release), 0),
            ]
            if deploy is not None:
                # Only a deploy still building, and still this builder's: one failed meanwhile by
                # another server (this one lost its lease) stays failed, and no release comes of it.
                held = await self._get(f"/deploys/{deploy.id}", Deploy)
                if held is None or held[0].status != "building" or held[0].builder != deploy.builder:
                    raise ApiError(
                        409, "deploy_ended", f"deploy {deploy.id} was ended while it built: deploy again"
                    )
                deploy.app, deploy.status, deploy.release, deploy.image = (
                    app_name,
                    "succeeded",
                    release.version,
                    release.image,
                )
                deploy.finished_at = now()
                puts.append((f"/deploys/{deploy.id}", _enc(deploy), held[1]))
            try:
                await self.store.txn(puts=puts, checks=checks)
                return app, release
            except Conflict:
                continue
        raise ApiError(409, "conflict", f"app {app_name!r} is changing too often; try again")

    # releases
    async def list_releases(self, app: str) -> tuple[list[Release], int]:
        return await self._list(f"/releases/{app}/", Release)

    async def get_release(self, app: str, version: int) -> Release:
        got = await self._get(release_key(app, version), Release)
        if got is None:
            raise ApiError(
                404,
                "release_not_found",
                f"app {app!r} has no release v{version}; see `osless releases {app}`",
            )
        return got[0]

    # deploys
    async def put_deploy(self, d: Deploy) -> None:
        await self.store.put(f"/deploys/{d.id}", _enc(d))

    async def end_deploy(self, d: Deploy) -> bool:
        """Record how a build ended, unless its deploy was ended meanwhile (failed by another server
        when this one lost its builder lease): whether it was written."""
        written = False

        def change(stored: Deploy) -> Deploy | None:
            nonlocal written
            if stored.status != "building" or stored.builder != d.builder:
                return None
            written = True
            return d

        await self.update(f"/deploys/{d.id}", Deploy, change)
        return written

    async def register_builder(self, token_id: str, ttl_s: float) -> str:
        """A new builder's key on a lease of its own: its name. Deploys it claims name it; the key
        lives as long as the builder keeps the lease alive (`renew_builder`)."""
        lease = await self.store.grant_lease(ttl_s)
        name = secrets.token_hex(8)
        value = json.dumps({"token": token_id, "lease": lease, "at": now()}).encode()
        await self.store.put(BUILDERS + name, value, if_revision=0, lease=lease)
        return name

    async def count_builders(self) -> int:
        """How many builder processes hold a lease now."""
        items, _ = await self.store.list(BUILDERS)
        return len(items)

    async def builder_token(self, name: str) -> str | None:
        """The id of the token that registered builder `name`; None once its lease is gone."""
        kv = await self.store.get(BUILDERS + name)
        return None if kv is None else str(json.loads(kv.value)["token"])

    async def renew_builder(self, name: str, token_id: str) -> bool:
        """Keep builder `name`'s lease alive; False if it is gone (the builder must register anew)."""
        kv = await self.store.get(BUILDERS + name)
        if kv is None or json.loads(kv.value)["token"] != token_id or kv.lease is None:
            return False
        try:
            await self.store.keepalive(kv.lease)
        except LeaseNotFound:
            return False
        return True

    async def drop_builder(self, name: str, token_id: str) -> None:
        kv = await self.store.get(BUILDERS + name)
        if kv is not None and json.loads(kv.value)["token"] == token_id and kv.lease is not None:
            with contextlib.suppress(LeaseNotFound):
                await self.store.revoke(kv.lease)  # the key goes with it

    async def claim_deploy(self, builder: str, here: Callable[[str], bool]) -> Deploy | None:
        """The oldest queued deploy whose source is `here(id)`, now `building` by `builder`
        (compare-and-swap: two builders never both get one); None if none is queued."""
        items, _ = await self.list_deploys()
        queued = [d for d in items if d.status == "queued" and here(d.id)]
        for d in sorted(queued, key=lambda d: d.created_at):
            won: list[Deploy] = []

            def change(stored: Deploy, won: list[Deploy] = won) -> Deploy | None:
                won.clear()
                if stored.status != "queued":
                    return None
                stored.status, stored.builder = "building", builder
                won.append(stored)
                return stored

            with contextlib.suppress(ApiError):  # deleted meanwhile, or busy: the next one
                await self.update(f"/deploys/{d.id}", Deploy, change)
            if won:
                return won[0]
        return None

    async def set_deploy_app(self, deploy_id: str, builder: str, app: str) -> Deploy:
        """Name the app of a deploy `builder` builds (read from its code); 409 if no longer its."""

        def change(stored: Deploy) -> Deploy | None:
            if stored.status != "building" or stored.builder != builder:
                raise ApiError(409, "not_claimed", f"deploy {deploy_id} is not being built by {builder}")
            if stored.app == app:
                return None
            stored.app = app
            return stored

        return await self.update(f"/deploys/{deploy_id}", Deploy, change)

    async def drop_builders(self) -> None:
        """Forget every builder's key: for a store only this process can use, whose builders from
        before this start are all gone (their leases may not have lapsed yet)."""
        held, _ = await self.store.list(BUILDERS)
        for kv in held:
            await self.store.delete(kv.key)

    async def fail_orphaned_deploys(self, error: str) -> list[str]:
        """Fail the deploys left `building` by a builder whose lease is gone; the ids failed. A deploy
        without a builder was written by a release that had none: nothing can still be building it."""
        items, _ = await self.list_deploys()
        building = [d for d in items if d.status == "building"]
        if not building:
            return []
        held, _ = await self.store.list(BUILDERS)
        alive = {kv.key.removeprefix(BUILDERS) for kv in held}
        failed = []
        for d in building:
            if d.builder is not None and d.builder in alive:
                continue
            seen = d.builder

            done: list[str] = []

            def change(stored: Deploy, seen: str | None = seen, done: list[str] = done) -> Deploy | None:
                done.clear()
                if stored.status != "building" or stored.builder != seen:  # ended, or held anew
                    return None
                stored.status, stored.error, stored.finished_at = "failed", error, now()
                done.append(stored.id)
                return stored

            with contextlib.suppress(ApiError):  # deleted meanwhile, or busy: the next sweep
                await self.update(f"/deploys/{d.id}", Deploy, change)
            failed += done
        return failed

    async def get_deploy(self, id: str) -> Deploy:
        got = await self._get(f"/deploys/{id}", Deploy)
        if got is None:
            raise ApiError(404, "deploy_not_found", f"deploy {id!r} does not exist")
        return got[0]

    async def list_deploys(self) -> tuple[list[Deploy], int]:
        return await self._list("/deploys/", Deploy)

    # instances
    async def list_instances(
        self, app: str | None = None, node: str | None = None
    ) -> tuple[list[Instance], int]:
        items, rev = await self._list("/instances/", Instance)
        return [i for i in items if (app is None or i.app == app) and (node is None or i.node == node)], rev

    async def create_instance(self, inst: Instance) -> Instance:
        """An instance of a release of its app, whose image it runs (409 `image_not_released`).

        Written only while that release stands (releases never change, and go with their app): a
        controller that read the app just before its delete, or before a new app of the name
        released its own v1, makes no instance of it."""
        for _ in range(20):
            got = await self._get(release_key(inst.app, inst.release), Release)
            await self.get_app(inst.app)  # 404 `app_not_found` first, for an app that is gone
            if got is None or got[0].image != inst.image:
                raise ApiError(
                    409,
                    "image_not_released",
                    f"image {inst.image[:12]}… is not release v{inst.release} of app {inst.app!r}: an "
                    "instance runs an image its own app released",
                )
            # Every app has its uid record (made with it; older ones since the version-2 migration):
            # none means the app was deleted since it was read, and none is made for it here.
            uid = await self.store.get(f"/appuids/{inst.app}")
            if uid is None:
                raise app_not_found(inst.app)
            inst.uid = _uid_of(uid)  # the API's word, never the caller's
            key = f"/instances/{inst.id}"
            try:
                # With it, that the app was placed on that node, kept until the app is deleted: only
                # such a node may hold its volumes (`placed_nodes`), whatever another node claims.
                # Its uid record is written again, unchanged: a delete of the app that listed its
                # instances before this one was made then conflicts, and lists them again.
                await self.store.txn(
                    puts=[
                        (key, _enc(inst), 0),
                        (f"{PLACED_PREFIX}{inst.app}/{inst.node}", b"{}", None),
                        (uid.key, uid.value, uid.mod_revision),
                    ],
                    checks=[(release_key(inst.app, inst.release), got[1])],
                )
                return inst
            except Conflict as e:
                if e.key == key:
                    raise ApiError(409, "instance_exists", f"instance {inst.id!r} already exists") from e
        raise ApiError(409, "conflict", f"app {inst.app!r} is changing too often; try again")

    async def placed_nodes(self, app: str) -> set[str]:
        """The nodes `app` was ever placed on (since it was made), its instances' now included."""
        items, _ = await self.store.list(f"{PLACED_PREFIX}{app}/")
        now_on = {i.node for i in (await self.list_instances(app=app))[0]}
        return {kv.key.rsplit("/", 1)[1] for kv in items} | now_on

    async def update_instance(self, id: str, change: Callable[[Instance], Instance | None]) -> Instance:
        return await self.update(f"/instances/{id}", Instance, change)

    async def delete_instance(self, id: str) -> bool:
        return await self.store.delete(f"/instances/{id}")

    # nodes
    async def list_nodes(self) -> tuple[list[Node], int]:
        return await self._list("/nodes/", Node)

    async def heartbeat_node(self, node: Node) -> Node:
        kv = await self.store.get(f"/nodes/{node.name}")
        if kv is not None and kv.lease is not None:
            try:
                await self.store.keepalive(kv.lease)
                await self.store.put(f"/nodes/{node.name}", _enc(node), lease=kv.lease)
                return node
            except Exception:  # lease expired between get and keepalive: grant a new one below
                pass
        lease = await self.store.grant_lease(node.ttl_s)
        await self.store.put(f"/nodes/{node.name}", _enc(node), lease=lease)
        return node

    # leaders
    async def get_leader(self, name: str) -> Leader | None:
        got = await self._get(f"/leaders/{name}", Leader)
        return None if got is None else got[0]

    async def list_leaders(self) -> tuple[list[Leader], int]:
        return await self._list("/leaders/", Leader)

    async def claim_leader(self, name: str, holder: str, ttl_s: float, token: str) -> Leader:
        """Grant or renew `name` to `holder` on a lease of `ttl_s` (compare-and-swap: taken only if
        free or already the holder's, asked with the token that took it). 409 naming the holder
        otherwise."""
        key = f"/leaders/{name}"
        for _ in range(20):
            kv = await self.store.get(key)
            if kv is not None:
                held = Leader.model_validate_json(kv.value)
                if held.holder != holder or held.token not in (None, token):
                    raise ApiError(
                        409,
                        "leader_taken",
                        f"{name!r} is held by {held.holder!r} (renewed at {held.renewed_at:.3f}, ttl "
                        f"{held.ttl_s:g}s); try again once its lease runs out",
                    )
                if kv.lease is not None:
                    try:
                        await self.store.keepalive(kv.lease)
                        held.renewed_at, held.token = now(), token  # a term of an earlier release: bound now
                        await self.store.put(key, _enc(held), if_revision=kv.mod_revision, lease=kv.lease)
                        return held
                    except Conflict:
                        continue  # stepped down or taken meanwhile: look again
                    except LeaseNotFound:
                        pass
                # Its lease ran out and the sweeper has not removed the key yet: a new term.
                try:
                    await self.store.delete(key, if_revision=kv.mod_revision)
                except Conflict:
                    continue
            lease = await self.store.grant_lease(ttl_s)
            leader = Leader(name=name, holder=holder, ttl_s=ttl_s, token=token)
            try:
                await self.store.put(key, _enc(leader), if_revision=0, lease=lease)
                return leader
            except Conflict:
                await self.store.revoke(lease)  # someone else was faster: read who, and answer 409
                continue
        raise ApiError(409, "conflict", f"leadership {name!r} is changing too often; try again")

    async def release_leader(self, name: str, holder: str, token: str, *, any_token: bool = False) -> bool:
        """Step down: True if `holder` held it (and no longer does), False if nobody held it; only
        with the token that took it, unless `any_token` (an admin ending a term)."""
        kv = await self.store.get(f"/leaders/{name}")
        if kv is None:
            return False
        held = Leader.model_validate_json(kv.value)
        if held.holder != holder:
            raise ApiError(409, "not_leader", f"{name!r} is held by {held.holder!r}, not by {holder!r}")
        if held.token not in (None, token) and not any_token:
            raise ApiError(
                409, "not_leader", f"{name!r} was taken with another token: only that one steps down"
            )
        if kv.lease is not None:
            await self.store.revoke(kv.lease)  # the key goes with its lease
        else:
            await self.store.delete(f"/leaders/{name}")
        return True

    # config
    async def get_config(self, app: str) -> tuple[ConfigState, int]:
        """The app's config and its store revision (0 when nothing was ever set)."""
        got = await self._get(f"/config/{app}", ConfigState)
        return got if got is not None else (ConfigState(app=app), 0)

    async def commit_config(self, state: ConfigState, rev: int, change: ConfigChange) -> None:
        """The new config and its history entry in one transaction; Conflict if it moved on.

        The first (`rev` 0) only while the app stands (404 `app_not_found`): the route read the app
        before, and a config made after its delete would be a new app of the name's, secrets and all.
        A config that exists is checked by its own revision: the delete took it."""
        puts: list[tuple[str, bytes, int | None]] = [
            (f"/config/{state.app}", _enc(state), rev),
            (f"/confighistory/{state.app}/{change.version:08d}", _enc(change), 0),
        ]
        await put_of_app(self.store, state.app, puts)

    async def config_history(self, app: str) -> list[ConfigChange]:
        items, _ = await self._list(f"/confighistory/{app}/", ConfigChange)
        return items

    async def watch(self, kind: str, after_revision: int) -> AsyncIterator[dict[str, Any]]:
        prefix, model = KINDS[kind]
        async for ev in self.store.watch(prefix, after_revision=after_revision):
            name = ev.key[len(prefix) :]
            obj = model.model_validate_json(ev.kv.value).model_dump() if ev.kv is not None else None
            yield {"type": ev.type, "name": name, "object": obj, "revision": ev.revision}
