"""An app whose instances ask more memory than this machine has: no node can take one."""

import osless

app = osless.App("bigmem")


@app.function(memory_mb=65536)
def hello(event, ctx):
    return "too big to run here"
