"""A deploy's build log in the store (`api.buildlog`), on a real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

from osless.api.buildlog import BuildLog
from osless.store import SQLiteStore


def test_a_log_is_begun_only_while_its_deploy_stands(tmp_path: Path) -> None:
    """A build's last line, written just after its app's delete took the deploy and its log (the
    release committed, then the delete, then `==> Released`), leaves nothing behind."""

    async def main() -> None:
        async with SQLiteStore(tmp_path / "state.db") as store:
            await store.put("/deploys/d-1", b"{}")
            log = BuildLog(store, "d-1", cap_bytes=1 << 20)
            assert await log.append(["==> Building"])
            # The app's delete: the deploy and its log in one transaction.
            await store.txn(deletes=[("/deploys/d-1", None)], delete_prefixes=["/buildlogs/d-1/"])
            assert not await log.append(["==> Released"], close=True)
            assert not await BuildLog(store, "d-2", cap_bytes=1 << 20).append(["never queued"])
            assert (await store.list("/buildlogs/"))[0] == []

    asyncio.run(main())
