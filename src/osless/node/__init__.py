"""The node agent and its spawn path: zygotes, instances, supervision, logs."""

from __future__ import annotations

from osless.node.agent import NodeAgent, run_dir_for
from osless.node.cgroups import Cgroups, InstanceCgroup
from osless.node.spawn import ExitStatus, Zygote, ZygoteFailed
from osless.node.supervisor import Supervisor, exit_reason

__all__ = [
    "Cgroups",
    "ExitStatus",
    "InstanceCgroup",
    "NodeAgent",
    "Supervisor",
    "Zygote",
    "ZygoteFailed",
    "exit_reason",
    "run_dir_for",
]
