"""What each platform process runs: `up` (every part on one machine), `node` (a machine that runs apps).

`osless up` hosts the API and the controllers, and the node of its own machine (`node.NodeHost`) in the
same loop; `osless node join` runs a `NodeHost` alone, against an API elsewhere. Either way the node's
parts reach the API over HTTP only, with the node's token.
"""

from __future__ import annotations

from osless.server.node import NodeConfig, NodeHost, default_node_name, run_node
from osless.server.up import UpConfig, run, save_credentials

__all__ = ["NodeConfig", "NodeHost", "UpConfig", "default_node_name", "run", "run_node", "save_credentials"]
