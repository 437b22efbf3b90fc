"""An app that pins its own uvicorn and h11, and reports what it imports.

The function's name says which uvicorn the build's import saw; `report` says what an instance sees.
"""

import importlib
import os
import sys

import h11
import uvicorn

import osless

app = osless.App("pinned")


@app.function(name="built_with_uvicorn_" + uvicorn.__version__.replace(".", "_"))
def built(event, ctx):
    return uvicorn.__version__


@app.function()
def report(event, ctx):
    importable = {}
    for name in ("yaml", "fastapi", "httpx", "pydantic", "typer"):
        try:
            importlib.import_module(name)
        except ImportError:
            importable[name] = False
        else:
            importable[name] = True
    return {
        "uvicorn": [uvicorn.__version__, uvicorn.__file__],
        "h11": [h11.__version__, h11.__file__],
        "importable": importable,
        "path": sys.path,
        "visible": {p: os.path.exists(p) for p in event["paths"]},
        "listed": {p: os.listdir(p) if os.path.isdir(p) else None for p in event["listed"]},
    }
