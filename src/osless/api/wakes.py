"""Work accepted for an app at zero wakes it at once: a message sent to one of its queues, an async
invocation of one of its functions (a schedule's tick is one).

The delivery goes through the gateway's activator all the same (`gateway.router`: a call that finds
no instance wakes the app and waits), and that stays the guarantee. Waking as the work is accepted
only starts the instance sooner: it forks while the send is answered, the consumer fetches the
message and calls the gateway, and the gateway checks the call's token, rather than after all of
that. Measured by benchmarks/events.py (a message handled from zero).
"""

from __future__ import annotations

import asyncio
import logging
import time

from osless.api.invocations import raise_if_cancelled
from osless.api.state import ApiState
from osless.contracts import App, AppStatus, now

__all__ = ["WAKE_CHECK_S", "wake", "wake_soon"]

log = logging.getLogger("osless")

# An app's status is looked at by the work sent to it at most this often (a send of a busy queue
# costs nothing more); an app that goes to zero meanwhile is woken by the activator.
WAKE_CHECK_S = 1.0
MAX_TRACKED = 4096  # apps that had work lately: cleared whole past this

_checked: dict[str, float] = {}  # app -> when work for it last looked (monotonic)
_tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks


def wake_soon(state: ApiState, app: str, reason: str) -> None:
    """If `app` is at zero (its status wants no instance), make it want one, as the gateway's
    activator does (`POST /v1/apps/{app}/wake`). Not waited for: the work's own path goes on."""
    at = time.monotonic()
    if at - _checked.get(app, -WAKE_CHECK_S) < WAKE_CHECK_S:
        return
    if len(_checked) >= MAX_TRACKED:
        _checked.clear()
    _checked[app] = at
    task = asyncio.create_task(_wake(state, app, reason))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def wake(state: ApiState, app: str, reason: str, *, touch: bool) -> AppStatus:
    """Make `app` want an instance if it is at zero, saying why. `touch`: note the wake's time even
    when it wants instances already (the gateway's activator: the autoscaler then keeps them a while);
    else such an app is left unwritten (work sent to a busy app costs no write)."""

    def change(a: App, s: AppStatus) -> AppStatus | None:
        if a.current_release is None or (s.desired and not touch):
            return None  # not deployed, or nothing to write
        s.woken_at = now()
        if not s.desired:
            s.desired, s.scale_reason = max(1, a.min), reason
        return s

    return await state.resources.update_app_status(app, change)


async def _wake(state: ApiState, app: str, reason: str) -> None:
    try:
        await wake(state, app, reason, touch=False)
    except Exception as e:  # the activator wakes it on delivery all the same
        raise_if_cancelled()
        log.info("waking %s (%s): %s", app, reason, e)
