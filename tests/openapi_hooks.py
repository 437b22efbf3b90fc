"""schemathesis hooks for tests/test_openapi.py (loaded by the schemathesis process, not by pytest).

Each one keeps out of the run something that cannot be fuzzed meaningfully, and says why; the request
otherwise goes out as generated, so valid requests stay valid and invalid ones invalid.
"""

from __future__ import annotations

from typing import Any

import schemathesis

# What FastAPI reads as true in a boolean query parameter.
_TRUE = {"1", "on", "t", "true", "y", "yes"}
# The app deployed for the run: deleting it would leave every other operation nothing to find.
KEEP = "hello"


def _true(value: Any) -> bool:
    return value is True or str(value).lower() in _TRUE


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    # watch=true on a list and follow=true on an app's logs stream until the client leaves: every such
    # request would end in a read timeout. They are asked without (a deploy's log with follow=true
    # ends with its build, so it stays in). tests/test_api.py reads those streams.
    path = case.operation.path
    for name in ("watch", "follow"):
        value = (case.query or {}).get(name)
        if name == "follow" and path.endswith("/log"):
            continue
        if isinstance(value, list) and any(_true(v) for v in value):
            case.query[name] = ["false" if _true(v) else v for v in value]
        elif value is not None and _true(value):
            case.query[name] = "false"
    if case.method.upper() == "DELETE" and (case.path_parameters or {}).get("app") == KEEP:
        case.path_parameters["app"] = KEEP + "-gone"
