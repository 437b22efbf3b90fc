"""What tests/test_runs.py runs in the app's sandbox: `python tools.py WHAT [ARGS]`."""

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
elif what == "who":
    print(os.getuid(), os.getcwd())
    for path in sys.argv[2:]:
        print(path, os.path.exists(path) and os.listdir(path))
