import os

import osless

app = osless.App("crashy")


@app.function()
def crash(event, ctx):
    print("about to exit with code 3", flush=True)
    os._exit(3)


@app.function()
def ok(event, ctx):
    return {"pid": os.getpid()}
