"""The functions of tests/test_invocations.py: async invocations, their retries and dead letters. Runs
are counted on a volume, per key: a retry may land on another instance."""

import os
import sys
import time
from pathlib import Path

import osless

app = osless.App("jobs", volumes={"/data": "jobs-data"})


def _count(key: str) -> int:
    path = Path("/data") / key
    n = int(path.read_text()) + 1 if path.exists() else 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(n))
    os.replace(tmp, path)
    return n


@app.function()
def echo(event, ctx):
    return {"echo": event}


@app.function()
def count(event, ctx):
    time.sleep(float(event.get("sleep", 0)))
    return {"runs": _count("count-" + event["key"])}


@app.function()
def flaky(event, ctx):
    n = _count("flaky-" + event["key"])
    if n < 3:
        raise RuntimeError(f"flaky failure {n}")
    return {"runs": n}


@app.function(retries=1)
def broken(event, ctx):
    raise ValueError("always broken")


@app.function(retries=0)
def huge_int(event, ctx):
    # An app lifts its own interpreter's limit: its answer is JSON the API's Python refuses to read.
    sys.set_int_max_str_digits(0)
    return {"runs": _count("huge-" + event["key"]), "n": 10**5000}


@app.function(retries=0)
def wide(event, ctx):
    # An app changes how its own interpreter writes JSON: DEL unescaped, 1 byte, not 6 (\u007f).
    import functools
    import json

    if not isinstance(json.dumps, functools.partial):
        json.dumps = functools.partial(json.dumps, ensure_ascii=False)
    return {"runs": _count("wide-" + event["key"]), "text": "\x7f" * 200_000}
