"""The `ctx` a function receives: who is asking, and how long it has left."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

__all__ = ["Context"]


@dataclass
class Context:
    """Per-invocation context: request id, app and function name, deadline and a logger."""

    request_id: str
    app: str
    function: str
    deadline: float  # epoch seconds
    log: logging.Logger = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.log = logging.getLogger(f"osless.app.{self.app}.{self.function}")

    def remaining_ms(self) -> int:
        """Milliseconds left before the platform ends this invocation with a timeout."""
        return max(0, int((self.deadline - time.time()) * 1000))
