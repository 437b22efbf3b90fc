"""A good app whose import takes seconds: a build of it is still building for a while."""

import sys
import time

import osless

print("importing slowly", file=sys.stderr, flush=True)
time.sleep(3)

app = osless.App("slow-import")


@app.function(timeout_s=10)
def greet(event, ctx):
    return {"message": f"Howdy, {(event or {}).get('name', 'world')}!"}
