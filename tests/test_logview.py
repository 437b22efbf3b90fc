"""How `osless logs` and `osless traces` show what an app wrote to a person's terminal.

In a process of its own, as the CLI runs: its modules are not imported by the test process."""

from __future__ import annotations

import json
import subprocess
import sys

from osless.runtime.applog import MARK

SHOW = """
import json, sys
from osless.cli.logview import show
from osless.logs import instance_line
line, stream, extra = instance_line(sys.stdin.read(), "stderr")
show({"ts": 0.0, "source": "hello-1", "line": line, "stream": stream, **(extra or {})})
"""
TREE = """
import json, sys
from osless.cli.traces import tree
from osless.cli.output import console
for line in tree([json.load(sys.stdin)]):
    console.print(line, markup=False, highlight=False)
"""


def _run(script: str, given: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", script], input=given, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_an_app_s_escape_sequences_and_newlines_are_shown_not_acted_on() -> None:
    # A marked line (the node parses it as the runtime's) whose text clears the screen, sets the
    # clipboard (OSC 52) and starts a second line made to look like the platform's own.
    forged = "ok\x1b[2J\x1b]52;c;cm0gLXJmIC8K\x07\n12:00:00 node-1 [osless] instance replaced\u202e"
    out = _run(SHOW, MARK + json.dumps({"line": forged, "request": "r\x1b[8m"}))
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
    first, second = out.splitlines()  # a newline kept (a traceback's), its line set in
    assert first.endswith("ok\\x1b[2J\\x1b]52;c;cm0gLXJmIC8K\\x07"), first
    assert second == "    12:00:00 node-1 [osless] instance replaced\\u202e", second


def test_a_span_name_cannot_write_to_the_terminal() -> None:
    span = {"trace_id": "a" * 32, "span_id": "b" * 16, "parent_id": None, "start": 1.0, "end": 2.0}
    span |= {"name": "GET /\x1b]0;owned\x07\nfake", "status": "ok", "kind": "server", "attributes": {}}
    out = _run(TREE, json.dumps(span))
    assert "\x1b" not in out and out.count("\n") == 1 and "GET /\\x1b]0;owned\\x07\\nfake" in out, repr(out)
