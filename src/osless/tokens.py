"""The kinds of bearer token the platform makes, told apart by their prefix.

Every part that takes a token (the API, a node's API, the gateway, the relay) looks at its prefix
first: a string that is no token of ours is refused before any lookup or MAC. One table, so a new
kind of token is added once.
"""

from __future__ import annotations

__all__ = ["APP", "NODE_BOUND", "PLAIN", "SCOPED"]

PLAIN = "osl_"  # a token the API keeps (its digest): the admin's, a role's, a node's, a gateway's
APP = "osla_"  # an app's own, made from the secret key: the app's identity in its own calls
# Scoped tokens the API signs for a holder, a role and an app, until a time: checked by their MAC.
# Names of apps and nodes hold no "_", so the parts of a scoped token split cleanly.
SCOPED = {
    "reader": "oslr_",  # reads one app's logs on one node
    "invoker": "osli_",  # what the API shows for its own calls of functions
    "peer": "oslp_",  # a server fetching from another server on the same etcd
    "volumes": "oslv_",  # one app's volumes on one node
    "runner": "oslc_",  # one command of one app on one node (`osless run`)
    "debugger": "osld_",  # one app's instances on one node (`osless debug`)
}
# The scoped roles made for one node: that node alone takes them (their holder is `...@NODE`).
NODE_BOUND = ("reader", "volumes", "runner", "debugger")
