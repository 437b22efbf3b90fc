"""An app whose one dependency, a local sdist, spies on its own build: `report` says what it saw.

Its import spies too: the name of its second function says which host uid imported it at build time.
"""

import spy_report

import osless

app = osless.App("spy")
with open("/proc/self/uid_map") as f:
    IMPORTED_AS = f.read().split()[1]


@app.function()
def report(event, ctx):
    return spy_report.REPORT


@app.function(name=f"imported_as_{IMPORTED_AS}")
def imported(event, ctx):
    return IMPORTED_AS
