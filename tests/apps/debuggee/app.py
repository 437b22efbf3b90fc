import time

import osless

app = osless.App("debuggee")


def sleepy_handler(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def busy_loop(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += sum(i * i for i in range(200))
    return n


@app.function(timeout_s=30)
def sleep(event, ctx):
    return sleepy_handler(float(event or 3))


@app.function(timeout_s=30)
def burn(event, ctx):
    return busy_loop(float(event or 3))
