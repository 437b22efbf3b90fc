"""The code that runs inside the sandbox, next to the app: nothing else of osless is there.

`loader` finds and imports the app, `inspect` prints its manifest at build time, `zygote` imports
it once and forks instances on request (over the `protocol` control channel), and `instance` is
each instance's HTTP server. Imports only the stdlib, `osless.sdk`, uvicorn and a2wsgi.

The public names are the submodules, imported by name (`from osless.runtime import protocol`):
the node agent needs only `protocol` and the builder only `inspect`, and neither should pay for
importing uvicorn here.
"""

from __future__ import annotations

__all__ = ["inspect", "instance", "loader", "protocol", "zygote"]
