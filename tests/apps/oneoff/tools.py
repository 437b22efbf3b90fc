"""What tests/test_runs.py runs in the app's sandbox: `python tools.py WHAT [ARGS]`."""

import json
import os
import sys

what = sys.argv[1]
if what == "settings":
    from app import settings

    print(settings.greeting, settings.password, os.environ["OSLESS_APP"], os.environ["OSLESS_RELEASE"])
elif what == "echo":
    line = input()
    print(f"got {line}")
    print("to stderr", file=sys.stderr)
elif what == "write":
    with open("/data/note", "w") as f:
        f.write(sys.argv[2])
    print(f"wrote {sys.argv[2]}")
elif what == "who":
    with open("/proc/self/uid_map") as f:
        print(
            json.dumps(
                {
                    "uid_map": f.read().split(),
                    "seen": {p: os.path.exists(p) and os.listdir(p) for p in sys.argv[2:]},
                }
            )
        )
