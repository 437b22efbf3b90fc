"""Leadership: of all the controller processes running, one acts.

Each candidate asks the API for the leadership (`PUT /v1/leaders/{name}`, a store lease of `ttl_s`)
and renews it every third of the ttl. It counts itself leader only until `ttl_s` after it SENT its
last successful renewal: the lease was renewed after that moment, so the candidate stops believing
before the store forgets, and a new leader never acts while the old one still does (clocks run at
the same rate; the lease sits on the API's clock, the belief on ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import time

from osless.client import ApiError, AsyncApi

__all__ = ["TTL_S", "Leadership", "default_holder"]

log = logging.getLogger("osless.leader")

TTL_S = 3.0


def default_holder() -> str:
    """This process, as a leader's name: host, pid and a random suffix. Host and pid alone collide:
    containers share host names and each one's first process is pid 1 or so; two candidates of one
    name would each take the other's renewals for their own, and both act."""
    host = re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.")[:60] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


class Leadership:
    """Campaigns for `name` and keeps it while it can; `is_leader` says whether to act now."""

    def __init__(
        self, api: AsyncApi, name: str = "controllers", holder: str | None = None, ttl_s: float = TTL_S
    ) -> None:
        self.api = api
        self.name = name
        self.holder = holder or default_holder()
        self.ttl_s = ttl_s
        self._until = 0.0  # monotonic: leader until then, unless renewed
        self.changed = asyncio.Event()  # set on each gain or loss, for the controllers to wake
        self._was = False

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._until

    async def run(self) -> None:
        try:
            while True:
                await self.campaign()
                pause = self.ttl_s / 3
                if self.is_leader:  # wake when the belief runs out too: losing it must show at once
                    pause = min(pause, max(0.05, self._until - time.monotonic()))
                await asyncio.sleep(pause)
                self._note()
        finally:
            await self.step_down()

    async def campaign(self) -> None:
        """One attempt: take or renew the leadership."""
        sent = time.monotonic()
        claim = {"holder": self.holder, "ttl_s": self.ttl_s}
        try:
            # An API that does not answer within the ttl has let the lease go anyway.
            await asyncio.wait_for(self.api.put(f"/v1/leaders/{self.name}", claim), self.ttl_s)
            self._until = sent + self.ttl_s
        except TimeoutError:
            log.warning("leadership %s not renewed: the API did not answer in %gs", self.name, self.ttl_s)
        except ApiError as e:
            if e.status == 409:
                self._until = 0.0  # someone else holds it
            elif self.is_leader:
                log.warning("leadership %s not renewed: %s", self.name, e.message)
        self._note()

    def _note(self) -> None:
        now = self.is_leader
        if now != self._was:
            self._was = now
            log.info("%s %s the leadership of %s", self.holder, "took" if now else "lost", self.name)
            self.changed.set()

    async def step_down(self) -> None:
        """Give it up now (on a clean stop), so that another takes over without waiting for the ttl."""
        was, self._until = self.is_leader, 0.0
        self._note()
        if was:
            with contextlib.suppress(ApiError):
                await self.api.delete(f"/v1/leaders/{self.name}?holder={self.holder}")
