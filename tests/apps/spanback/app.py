"""The callee of tests/test_traces.py: a function spanfront may call."""

import osless

app = osless.App("spanback")


@app.function()
def work(event, ctx):
    return {"doubled": 2 * int((event or {}).get("n", 0))}
