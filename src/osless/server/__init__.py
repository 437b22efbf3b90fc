"""What each platform process runs: `api` (the API, the controllers, the collector and the builder),
`node` (a machine that runs apps), `up` (both, on one machine), `cluster` (a whole cluster on one
machine, to try it out).

`osless up` hosts an `api.ApiHost` on SQLite and the node of its own machine (`node.NodeHost`) in the
same loop; `osless server --etcd URL` runs an `ApiHost` alone, on etcd; `osless node join` runs a
`NodeHost` alone, against an API elsewhere. Either way the node's parts reach the API over HTTP only,
with the node's token.
"""

from __future__ import annotations

from osless.server.api import ApiConfig, ApiHost, run_server, save_credentials
from osless.server.node import NodeConfig, NodeHost, default_node_name, run_node
from osless.server.up import UpConfig, run

__all__ = [
    "ApiConfig",
    "ApiHost",
    "NodeConfig",
    "NodeHost",
    "UpConfig",
    "default_node_name",
    "run",
    "run_node",
    "run_server",
    "save_credentials",
]
