"""An app that fetches from the hosts it lists, through the sandbox's HTTP_PROXY, as any app would.

Its `egress` list is `egress.json` beside it: the test writes there the addresses it made up.
"""

import json
import pathlib
import urllib.error
import urllib.request

import osless

app = osless.App("fetcher", egress=json.loads((pathlib.Path(__file__).parent / "egress.json").read_text()))


@app.function()
def fetch(event, ctx):
    try:
        with urllib.request.urlopen(event["url"], timeout=10) as r:  # HTTP_PROXY: the forwarder
            return {"status": r.status, "body": r.read().decode()[:1000]}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()[:1000]}
    except Exception as e:
        return {"error": type(e).__name__, "message": str(e)[:1000]}
