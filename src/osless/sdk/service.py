"""`osless.service("orders")`: another app of the platform, reached by name."""

from __future__ import annotations

from dataclasses import dataclass

from osless.sdk.app import NAME_RE
from osless.sdk.errors import UsageError

__all__ = ["Service", "service"]


@dataclass(frozen=True)
class Service:
    """An app by name. Its `url` goes through the egress proxy, which sends `*.osless` to that app."""

    name: str

    @property
    def url(self) -> str:
        return f"http://{self.name}.osless"


def service(name: str) -> Service:
    """The app called `name`: `httpx.get(osless.service("orders").url + "/items")`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"osless.service({name!r}): give an app name, such as osless.service('orders')")
    return Service(name)
