"""`osless dashboard`: a one-time link that signs this CLI's token into the dashboard (`/ui`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from osless.cli.credentials import call, client
from osless.cli.output import JsonOpt, console, print_json

if TYPE_CHECKING:
    from osless.client.sync import Api

__all__ = ["dashboard", "print_up_link", "sign_in_link"]


def sign_in_link(api: Api) -> str:
    """The API's URL of a fresh one-time sign-in link: the code in it is good once, for two minutes,
    and is not the token (the token never appears in a URL)."""
    made = call(api.post, "/v1/dashboard/links")
    return f"{api.base_url}{made['path']}"


def dashboard(json_out: JsonOpt = False) -> None:
    """Print a one-time link that opens the dashboard signed in with this CLI's token."""
    url = sign_in_link(client())
    if json_out:
        print_json({"url": url})
        return
    console.print(f"Dashboard: {url}", soft_wrap=True, highlight=False)
    console.print("  (good once, for two minutes; run `osless dashboard` again for another)", highlight=False)


def print_up_link(api_url: str, token: str) -> None:
    """What `osless up` prints once up, from a thread of its own (the API answers on the loop)."""
    from osless.client.sync import Api
    from osless.errors import ApiError

    try:
        made = Api(api_url, token).post("/v1/dashboard/links")
    except ApiError as e:
        console.print(f"  Dashboard: {api_url}/ui (no sign-in link: {e.message})", highlight=False)
        return
    url = f"{api_url}{made['path']}"
    console.print(
        f"  Dashboard: {url}   (one-time sign-in link; `osless dashboard` makes another)",
        soft_wrap=True,
        highlight=False,
    )
