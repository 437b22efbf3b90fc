"""The builder process that `osless up` and `osless server` start beside the API, kept up.

A child process (`python -m osless.builder`), as the gateway processes are: the API's process never
builds, nor imports the builder. It gets a builder token of its own through its environment (none of
the platform's other `OSLESS_*` settings: the admin's token or the secrets' key may be among them),
its data in `<data dir>/builder`, and dies with its parent (PR_SET_PDEATHSIG). When it dies it is
started again, with backoff; what it was building is failed once its lease lapses.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from osless.pdeathsig import die_with_parent
from osless.server.children import KeptChild

__all__ = ["BuilderChild"]


class BuilderChild(KeptChild):
    what = "the builder process"
    stop_grace_s = 20.0  # its builds are stopped and their deploys failed, saying so, before it exits

    def __init__(self, *, api_url: str, token: str, data_dir: Path, sandbox: bool) -> None:
        super().__init__()
        self.api_url = api_url
        self.token = token
        self.data_dir = data_dir
        self.sandbox = sandbox

    def spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OSLESS_")}
        env["OSLESS_BUILDER_TOKEN"] = self.token
        args = [
            sys.executable,
            "-m",
            "osless.builder",
            "--api",
            self.api_url,
            "--data-dir",
            str(self.data_dir),
        ]
        if not self.sandbox:
            args.append("--no-sandbox")
        parent = os.getpid()
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, env=env, preexec_fn=lambda: die_with_parent(parent)
        )
