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


@app.function()
def hog(event, ctx):
    chunks = []
    for _ in range(64):  # up to 1 GiB, far past the instance's 256 MB limit
        chunks.append(bytearray(16 * 1024 * 1024))
    return len(chunks)


@app.function()
def bad_result(event, ctx):
    return {1, 2, 3}


@app.function()
def fails(event, ctx):
    raise ValueError("the answer is not 42")
