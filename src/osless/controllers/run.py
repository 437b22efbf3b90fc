"""The controllers together: one leadership; the scheduler, the autoscaler and the clock (schedules)
acting while it holds."""

from __future__ import annotations

import asyncio

from osless.client import AsyncApi
from osless.controllers.autoscaler import Autoscaler
from osless.controllers.clock import Clock
from osless.controllers.leader import TTL_S, Leadership
from osless.controllers.scheduler import Scheduler

__all__ = ["run_controllers"]


async def run_controllers(api: AsyncApi, holder: str | None = None, ttl_s: float = TTL_S) -> None:
    """Run until cancelled (stepping down then) or until a part fails."""
    leadership = Leadership(api, holder=holder, ttl_s=ttl_s)
    tasks = [
        asyncio.create_task(leadership.run(), name="the leadership"),
        asyncio.create_task(Scheduler(api, leadership).run(), name="the scheduler"),
        asyncio.create_task(Autoscaler(api, leadership).run(), name="the autoscaler"),
        asyncio.create_task(Clock(api, leadership).run(), name="the clock"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()  # a part that ended on its own: its error, or a clear one
        raise RuntimeError(f"{next(iter(done)).get_name()} stopped")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
