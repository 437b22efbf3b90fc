"""Tells it started (a file in the build's TMPDIR), then hangs, as a stuck or hostile setup.py would."""

import os
import tempfile
import time

open(os.path.join(tempfile.gettempdir(), "hang-started"), "w").close()
time.sleep(600)
