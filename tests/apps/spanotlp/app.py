"""An app that sends its spans by OTLP, to the collector tests/test_traces.py runs: its address is
`collector.txt` beside it, which the test writes, set as the app's OTEL_EXPORTER_OTLP_ENDPOINT and
listed in its egress."""

import os
import pathlib
import urllib.parse

import osless

endpoint = (pathlib.Path(__file__).parent / "collector.txt").read_text().strip()
os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
app = osless.App("spanotlp", egress=[urllib.parse.urlsplit(endpoint).hostname])


@app.function()
def hello(event, ctx):
    return {"hello": "otlp"}
