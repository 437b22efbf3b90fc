"""gateway.upstream: who listens on an instance's socket is checked before a byte is sent."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from osless.gateway.upstream import Unreachable, Upstream


async def _serve(path: Path) -> asyncio.AbstractServer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_unix_server(answer, str(path))


def test_a_socket_served_by_another_process_than_the_instance_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "i.web"
        server = await _serve(path)
        try:
            me = (os.getpid(), os.getuid())
            for peer in ((me[0] + 1, me[1]), (me[0], me[1] + 100_000)):
                with pytest.raises(Unreachable, match="not by the instance"):
                    await Upstream(str(path), peer).acquire()
            conn = await Upstream(str(path), me).acquire()
            assert conn.transport is not None
            conn.abort()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
