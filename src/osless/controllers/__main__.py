"""`python -m osless.controllers --api URL`: the scheduler and the autoscaler as a process of their own.

Any number of them may run against one API (and `osless up` runs its own): they elect one leader,
which acts; the others keep their caches warm and take over within a few seconds of its death.
The token comes from `OSLESS_TOKEN` or from `--token-file`, never from argv, which `ps` shows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
from pathlib import Path

from osless.client import AsyncApi
from osless.controllers.leader import TTL_S, default_holder
from osless.controllers.run import run_controllers

MAX_TOKEN_BYTES = 4096
HOLDER = re.compile(r"^[a-z0-9][a-z0-9.-]{0,80}$")


def _token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            with args.token_file.open("rb") as f:
                data = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as e:
            raise SystemExit(f"cannot read the token file {args.token_file}: {e.strerror or e}") from None
        if len(data) > MAX_TOKEN_BYTES:
            raise SystemExit(
                f"the token file {args.token_file} is larger than a token ({MAX_TOKEN_BYTES} bytes)"
            )
        token = bytes(data).decode("ascii", "replace").strip()
    else:
        token = os.environ.get("OSLESS_TOKEN", "").strip()
    if not token:
        raise SystemExit("no token: set OSLESS_TOKEN or pass --token-file FILE")
    return token


async def _serve(api_url: str, token: str, holder: str, ttl_s: float) -> None:
    api = AsyncApi(api_url, token)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    controllers = asyncio.create_task(run_controllers(api, holder=holder, ttl_s=ttl_s))
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([controllers, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        controllers.cancel()  # steps down, so another takes over at once
        with contextlib.suppress(asyncio.CancelledError):
            await controllers
        await api.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m osless.controllers", description=__doc__.splitlines()[0])
    parser.add_argument("--api", required=True, help="the API's URL, e.g. http://127.0.0.1:7070")
    parser.add_argument("--token-file", type=Path, help="a file holding the token (default: $OSLESS_TOKEN)")
    parser.add_argument("--holder", default=None, help="this candidate's name (default: host and pid)")
    parser.add_argument("--ttl", type=float, default=TTL_S, help="seconds a leader holds without renewing")
    args = parser.parse_args()
    holder = args.holder or default_holder()
    if not HOLDER.fullmatch(holder):
        parser.error("--holder: lowercase letters, digits, '.' and '-' only, at most 81 characters")
    if not 1 <= args.ttl <= 60:
        parser.error("--ttl: between 1 and 60 seconds")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    asyncio.run(_serve(args.api, _token(args), holder, args.ttl))


if __name__ == "__main__":
    main()
