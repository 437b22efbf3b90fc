"""Build errors a user can act on: project-relative paths, and what to add for a missing module."""

from __future__ import annotations

import re
from pathlib import Path

# Import names whose package on the index has another name: the common ones a user meets first.
_PACKAGES = {
    "yaml": "PyYAML",
    "PIL": "Pillow",
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "bs4": "beautifulsoup4",
    "dateutil": "python-dateutil",
    "dotenv": "python-dotenv",
    "jwt": "PyJWT",
    "magic": "python-magic",
    "serial": "pyserial",
    "Crypto": "pycryptodome",
    "attr": "attrs",
    "google.protobuf": "protobuf",
}
_MAX_LINE = 2000  # a line an app printed: rewritten only this far, whatever it holds
_MISSING = re.compile(r"^ModuleNotFoundError: No module named '([A-Za-z_][A-Za-z0-9_.]{0,99})'$")
_FRAME = re.compile(r'^\s*File "([^"\n]{1,500})", line \d+')


def relative(line: str, code: Path, deps: Path) -> str:
    """`line` with the build's layer paths made the project's: /…/layers/<code>/app.py -> app.py,
    /…/layers/<deps>/six.py -> site-packages/six.py (the dependency layer is the app's site-packages)."""
    line = line[:_MAX_LINE]
    line = line.replace(f"{code}/", "")
    return line.replace(f"{deps}/", "site-packages/")


def missing_module(lines: list[str], code: Path, files: Path | None = None) -> str | None:
    """For a ModuleNotFoundError at import, the sentence that says which package to add; else None.
    `code`: the code folder as the traceback names it; `files`: where it is on this host (default `code`)."""
    if not lines:
        return None
    found = _MISSING.match(lines[-1].strip()[:_MAX_LINE])
    if found is None:
        return None
    module = found.group(1)
    # The app's own file that did the import: the last frame in the code layer.
    where = "the app"
    for ln in reversed(lines[-200:]):
        frame = _FRAME.match(ln[:_MAX_LINE])
        if frame and frame.group(1).startswith(f"{code}/"):
            where = frame.group(1)[len(f"{code}/") :]
            break
    top = module.split(".")[0]
    package = _PACKAGES.get(module) or _PACKAGES.get(top) or top
    named = f"{package} (the package that provides {top})" if package != top else package
    files = code if files is None else files
    if (files / "pyproject.toml").is_file():  # the build reads its dependencies first
        todo = f"add {named} to [project].dependencies in pyproject.toml"
    elif (files / "requirements.txt").is_file():
        todo = f"add {named} to requirements.txt"
    else:
        todo = f"create a requirements.txt next to the app that lists {named}"

    return f"{where} imports {module}, which is not installed: {todo}, then deploy again."
