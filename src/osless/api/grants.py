"""Which apps may call which functions of another app: decided by the callee's owner.

Like Lambda's resource policy (`add-permission`): `osless functions allow orders.quote --app shop`
stores `/grants/orders/quote/shop` (`*` for every function of `orders`), and an app calling
through its node's egress proxy (api/routes/functions.py) is let through only if such a grant
exists. A queue's senders are grants too, on `queue:{name}` (`osless queue allow shop.orders --app
web`: `/grants/shop/queue:orders/web`), which `*` does not cover. Grants are deleted with either
app (api/resources.py `delete_app`).
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from osless.api.errors import ApiError
from osless.api.models import now
from osless.api.resources import put_of_app
from osless.store import Store

__all__ = [
    "ANY_FUNCTION",
    "MAX_GRANTS_PER_APP",
    "Grant",
    "allow",
    "allowed",
    "deny",
    "list_grants",
    "may_send",
    "queue_grant",
]

ANY_FUNCTION = "*"
PREFIX = "/grants/"
# Grants on one app's functions: each is a key in the store, which whoever deploys the app could
# otherwise grow without end (every app's deletion reads them all). Lambda's resource policy holds
# about as many statements.
MAX_GRANTS_PER_APP = 100


class Grant(BaseModel):
    app: str  # the callee
    function: str  # a function of it, or "*"
    caller: str  # the app allowed to call it
    by: str = ""  # the token's name that allowed it
    at: float = 0.0


def _key(app: str, function: str, caller: str) -> str:
    return f"{PREFIX}{app}/{function}/{caller}"


async def allow(store: Store, app: str, function: str, caller: str, by: str) -> Grant:
    """Let `caller` call `app.function` (idempotent: an existing grant is kept as it was)."""
    key = _key(app, function, caller)
    found = await store.get(key)
    if found is not None:
        return Grant.model_validate_json(found.value)
    held, _ = await store.list(f"{PREFIX}{app}/")
    if len(held) >= MAX_GRANTS_PER_APP:
        raise ApiError(
            409,
            "too_many_grants",
            f"app {app} has {len(held)} grants on its functions, the most it may have: take some back "
            f"(`osless functions deny`), or grant {app}.* to a caller for all its functions at once",
        )
    grant = Grant(app=app, function=function, caller=caller, by=by, at=now())
    await put_of_app(store, app, [(key, grant.model_dump_json().encode(), None)])  # not once the app is gone
    return grant


async def deny(store: Store, app: str, function: str, caller: str) -> bool:
    """Take the grant back; False if there was none."""
    return await store.delete(_key(app, function, caller))


async def list_grants(store: Store, app: str) -> list[Grant]:
    items, _ = await store.list(f"{PREFIX}{app}/")
    out = []
    for kv in items:
        try:
            out.append(Grant.model_validate_json(kv.value))
        except ValueError:
            continue  # not ours to show: a record this code cannot read
    return sorted(out, key=lambda g: (g.function, g.caller))


async def allowed(store: Store, app: str, function: str, caller: str) -> bool:
    """Whether `caller` may call `app.function`: a grant for that function, or for all of them."""
    exact, every = await asyncio.gather(
        store.get(_key(app, function, caller)), store.get(_key(app, ANY_FUNCTION, caller))
    )
    return exact is not None or every is not None


def queue_grant(queue: str) -> str:
    """What a queue's grant holds in place of a function (`:` is in no function's name)."""
    return f"queue:{queue}"


async def may_send(store: Store, app: str, queue: str, caller: str) -> bool:
    """Whether `caller` may send to `app`'s queue: its own grant, not `*` (that is for functions)."""
    return await store.get(_key(app, queue_grant(queue), caller)) is not None
