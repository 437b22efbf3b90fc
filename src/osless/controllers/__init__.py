"""Controllers: clients of the API that turn what is desired into what should run where."""

from __future__ import annotations

from osless.controllers.autoscaler import Autoscaler, decide
from osless.controllers.leader import Leadership
from osless.controllers.run import run_controllers
from osless.controllers.scheduler import Scheduler, desired_instances

__all__ = ["Autoscaler", "Leadership", "Scheduler", "decide", "desired_instances", "run_controllers"]
