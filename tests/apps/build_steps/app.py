"""An app whose build step writes a file into its code folder, which its function then reads."""

from pathlib import Path

import osless

app = osless.App("stepper", build=["python make_greeting.py hello", "test -s greeting.json"])


@app.function()
def greeting(event, ctx):
    return (Path(__file__).parent / "greeting.json").read_text()
