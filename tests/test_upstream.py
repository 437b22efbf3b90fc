"""gateway.upstream: who listens on an instance's socket is checked before a byte is sent; a relay
that does not take a connection is given up on quickly, and marked down."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from osless.gateway.outliers import Outliers
from osless.gateway.upstream import RelayDown, Relayed, Unreachable, Upstream


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
            await asyncio.sleep(0.1)  # the relay's handlers see their connections close
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def _relayed(port: int) -> Relayed:
    return Relayed("127.0.0.1", port, "osl_token", "i-1", "web")


def test_a_relay_that_takes_no_connection_is_given_up_on_at_once_and_marked_down() -> None:
    """A dead machine answers nothing: a listener whose queue is full drops the handshake (the
    connect timeout), one that never accepts never answers the preamble (the answer timeout), and
    a closed port refuses. Each is `RelayDown` within seconds (a try elsewhere follows), and its
    address is marked."""

    async def main() -> None:
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        filler = socket.create_connection(full.getsockname())  # fills its queue: the next SYN is dropped
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nobody reads
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        refused = closed.getsockname()[1]
        closed.close()
        outliers = Outliers()
        try:
            for port, said, within in [
                (full.getsockname()[1], "no handshake within", 2.0),
                (silent.getsockname()[1], "no answer within", 3.0),
                (refused, "Connect call failed|refused", 0.5),
            ]:
                up = Upstream("x", relay=_relayed(port), outliers=outliers)
                started = time.monotonic()
                with pytest.raises(RelayDown, match=said):
                    await up.acquire()
                assert time.monotonic() - started < within
                assert outliers.down(("127.0.0.1", port))
        finally:
            for s in (filler, full, silent):
                s.close()

    asyncio.run(main())


def test_a_relay_that_says_the_instance_is_gone_is_not_marked_down() -> None:
    """The relay answered: its node is up, only that instance cannot be reached; once it says OK,
    the mark of an earlier failure goes."""

    async def main() -> None:
        answers = [b"ERR not_found instance i-1 is not running and ready on node n2\n", b"OK\n"]

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readline()
                writer.write(answers.pop(0))
                await writer.drain()
                await reader.read()
            except ConnectionError:
                pass  # the gateway aborts a refused connection
            finally:
                writer.close()

        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        outliers = Outliers()
        up = Upstream("x", relay=_relayed(port), outliers=outliers)
        try:
            with pytest.raises(Unreachable, match="not_found") as refused:
                await up.acquire()
            assert not isinstance(refused.value, RelayDown)
            assert not outliers.active()
            outliers.failed(("127.0.0.1", port), "an earlier failure")
            conn = await up.acquire()
            assert not outliers.down(("127.0.0.1", port))
            conn.abort()
        finally:
            await asyncio.sleep(0.1)  # the relay's handlers see their connections close
            server.close()
            await server.wait_closed()

    asyncio.run(main())
