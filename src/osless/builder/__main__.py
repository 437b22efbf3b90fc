"""`python -m osless.builder`: the builder process, as `osless builder` (see osless.server.builder)."""

from __future__ import annotations

import typer

from osless.cli.builder import builder

if __name__ == "__main__":
    typer.run(builder)
