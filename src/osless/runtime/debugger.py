"""debugpy in an instance, started only when a debug session asks for it (`osless debug attach`).

The node asks on the instance's control socket (`POST /debug/listen`, which only the platform
reaches); the instance then listens with debugpy's in-process adapter (no adapter process: the
sandbox runs none) on 127.0.0.1 of its own network namespace, which holds nothing but its sandbox's
processes and which the node enters to connect (`node.attach`). Nothing listens before that ask:
debugpy is not even imported. Once listening, it listens until the instance ends, and the node
replaces the instance when the session ends, so no debugger outlives its session.
"""

from __future__ import annotations

import os
import threading

__all__ = ["listen"]

_lock = threading.Lock()
_port: int | None = None


def listen() -> int:
    """The port debugpy listens on in this instance, started at the first call (in a thread: it
    blocks for a moment while pydevd starts)."""
    global _port
    with _lock:
        if _port is None:
            # pydevd warns on stderr of frozen stdlib modules at each start; they are the stdlib's,
            # never the app's, where breakpoints go.
            os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
            import debugpy

            _, _port = debugpy.listen(("127.0.0.1", 0), in_process_debug_adapter=True)
        return _port
