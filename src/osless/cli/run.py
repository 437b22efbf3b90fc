"""The `osless` program: loads the CLI with the garbage collector paused, then runs the command.

Loading the CLI makes tens of thousands of objects that all live until the command exits; the cyclic
collector would walk them again and again as they pile up, and once more at exit: ~10-15 % of a short
command's time, which must stay well under 150 ms.
"""

from __future__ import annotations

import gc
from typing import NoReturn


def main() -> NoReturn:
    gc.disable()
    from osless.cli.main import main as run  # here: to load it with the collector paused

    gc.freeze()  # kept to the end: no collection need look at it again
    gc.enable()
    run()
