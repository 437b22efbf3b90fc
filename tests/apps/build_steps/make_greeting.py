"""The build step: imports the app and its dependency as at run time, writes greeting.json here, and
records where else it could write (nowhere but here and /tmp)."""

import json
import os
import sys
from pathlib import Path

import app  # the app's own code is importable, as at run time
import six

here = Path.cwd()


def writable(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "probe"), "w") as f:
            f.write("x")
    except OSError:
        return False
    return True


deps = os.path.dirname(six.__file__)
print(f"building {app.app.name} with six {six.__version__}")
result = {
    "word": sys.argv[1],
    "six": six.__version__,
    "cwd_is_code": here == Path(app.__file__).parent,
    "writable": {
        "code": writable(str(here)),
        "deps": writable(deps),
        "root": writable("/"),
        "usr": writable("/usr"),
        "tmp": writable("/tmp"),
    },
}
os.remove(here / "probe")
(here / "greeting.json").write_text(json.dumps(result, sort_keys=True))
