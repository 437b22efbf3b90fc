"""An app's requirements: read from pyproject.toml or requirements.txt, and checked before uv sees them.

Named requirements (`requests>=2`) go to the package index. A requirement that is a URL or a path
would have the build fetch or read what the platform does not control, so:
- URLs are refused: VCS (`git+https://...`), `name @ https://...`, and `file:` URLs outside the source;
- a path (`./vendor/lib`, `../x`, `/abs`, `x.whl`, `foo-1.0.tar.gz`, `name @ file:...`) is allowed
  only when it resolves (realpath) inside the uploaded source. The build copies it into a writable
  source folder (`src` below: the code layer is read-only, and building a package writes into its
  folder) and hands uv that copy. Such a lock depends on the code, not only on its text.
uv's own syntax is narrowed the same way: no `-r`/`-e`/index options, no `${VAR}` (uv would expand
it), and of the per-requirement options only `--hash`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement

from osless.builder.process import BuildError, Log

__all__ = ["Requirements", "read_requirements"]

_SHOWN = 200  # an app's own text quoted in a message or the log: never more than this

# uv reads a requirement as a path or URL, not a name, when its first word looks like one of these
# (uv's `looks_like_unnamed_requirement`): the same test here, so that both agree on what it is.
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_ARCHIVES = (".whl", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz", ".tar.zst", ".tar", ".zip")
_EXTRAS_RE = re.compile(r"^(.*?)(\[[^\]]*\])$")
_HASHES_RE = re.compile(r"(?:\s+--hash[=\s]\s*[A-Za-z0-9]+:[A-Za-z0-9]+)+\s*")
_VCS = ("git+", "hg+", "svn+", "bzr+")


@dataclass
class Requirements:
    """What uv resolves, and which paths of the source the build must copy for it."""

    lines: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)  # paths relative to the source root

    @property
    def text(self) -> str:
        return "".join(f"{line}\n" for line in self.lines)


def read_requirements(code: Path, log: Log, *, src: str) -> Requirements:
    """The app's requirements: pyproject `[project].dependencies`, else requirements.txt, else none.

    `src` is where the build's copy of the source's local packages is, as uv will see it."""
    raw: list[tuple[str, str]] | None = None  # (where, requirement)
    pyproject = code / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BuildError(f"pyproject.toml is not valid TOML ({e}); fix it and deploy again.") from e
        tool = data.get("tool")
        if isinstance(tool, dict) and "uv" in tool:
            log(
                "==> pyproject.toml [tool.uv] is ignored (sources, indexes, settings): "
                "builds use the platform's index"
            )
        project = data.get("project")
        deps = project.get("dependencies") if isinstance(project, dict) else None
        if deps is not None:
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise BuildError(
                    "pyproject.toml [project].dependencies must be a list of requirement strings, "
                    'like dependencies = ["requests>=2"].'
                )
            log("==> Requirements: pyproject.toml [project].dependencies")
            raw = [(f"pyproject.toml dependency {_quote(d.strip())}", d.strip()) for d in deps if d.strip()]
    if (code / "uv.toml").is_file():
        log("==> uv.toml is ignored: builds use the platform's index and settings")
    if raw is None:
        req_file = code / "requirements.txt"
        if not req_file.is_file():
            log("==> Requirements: none (no pyproject.toml dependencies, no requirements.txt)")
            return Requirements()
        log("==> Requirements: requirements.txt")
        text = req_file.read_text(encoding="utf-8", errors="replace")
        raw = [(f"requirements.txt line {n}", line) for n, line in _requirements_txt(text)]
    reqs = Requirements()
    for where, line in raw:
        checked = _check(line, where, code, src, reqs.local)
        if checked is not None:
            reqs.lines.append(checked)
        else:
            log(f"==> Requirements: dropping {_quote(line)}: the platform provides osless itself")
    return reqs


def _requirements_txt(text: str) -> list[tuple[int, str]]:
    reqs = []
    for number, raw in enumerate(text.replace("\\\n", "").splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        line = re.sub(r"\s+#.*$", "", line).strip()
        if not line:
            continue
        if line.startswith("-"):
            raise BuildError(
                f"requirements.txt line {number}: {_quote(line)} is not supported; options such as -r, -e, "
                "-c and --index-url are not allowed. List each requirement on its own line "
                "(for example requests>=2)."
            )
        reqs.append((number, line))
    return reqs


def _check(line: str, where: str, code: Path, src: str, local: list[str]) -> str | None:
    """`line` as uv gets it (local paths rewritten under `src`), None for osless itself; else BuildError."""
    if "${" in line:
        raise BuildError(f"{where}: environment variables (${{...}}) are not expanded here; write the value.")
    spec, hashes = line, ""
    if (m := re.search(r"\s-", line)) is not None:
        spec, hashes = line[: m.start()], line[m.start() :]
        if not _HASHES_RE.fullmatch(hashes):
            raise BuildError(
                f"{where}: {_quote(hashes.strip())} is not supported; of the per-requirement options "
                "only --hash is allowed."
            )
    first, _, rest = spec.partition(" ")
    if _looks_unnamed(first):
        target, extras = _split_extras(first)
        rest = f" {rest}" if rest else ""
        return _local(target, where, code, src, local) + extras + rest + hashes
    try:
        req = Requirement(spec)
    except InvalidRequirement as e:
        raise BuildError(f"{where}: {_quote(spec)} is not a valid requirement ({str(e)[:_SHOWN]}).") from e
    if re.sub(r"[-_.]+", "-", req.name).lower() == "osless":
        return None
    if req.url is None:
        return line
    path = _local(req.url, where, code, src, local)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f" ; {req.marker}" if req.marker is not None else ""
    return f"{req.name}{extras} @ file://{path}{marker}{hashes}"


def _looks_unnamed(word: str) -> bool:
    target, _ = _split_extras(word)
    return (
        target[:1] in ("/", "\\", ".")
        or bool(_SCHEME_RE.match(target))
        or "/" in target
        or "\\" in target
        or target.lower().endswith(_ARCHIVES)
    )


def _split_extras(word: str) -> tuple[str, str]:
    m = _EXTRAS_RE.match(word)
    return (m.group(1), m.group(2)) if m else (word, "")


def _local(target: str, where: str, code: Path, src: str, local: list[str]) -> str:
    """The path inside the source that `target` names, as uv will see its copy under `src`."""
    shown = _quote(target)
    if target.lower().startswith("file:"):
        parts = urlsplit(target)
        if parts.netloc not in ("", "localhost"):
            raise BuildError(
                f"{where}: {shown} names a file on another host; only paths inside the app's "
                "source are allowed."
            )
        target = unquote(parts.path)
    elif _SCHEME_RE.match(target):
        kind = "a VCS URL" if target.lower().startswith(_VCS) else "a URL"
        raise BuildError(
            f"{where}: {shown} is {kind}; builds install from the package index only. Publish the "
            "package to the index, or put it in the app's folder (for example ./vendor/mylib) and "
            "name that path."
        )
    root = os.path.realpath(code)
    # Relative to the source root (where requirements.txt and pyproject.toml are); absolute as it is.
    real = os.path.realpath(os.path.join(root, target))
    if real != root and not real.startswith(root + os.sep):
        raise BuildError(
            f"{where}: {shown} points outside the app's source; a requirement that is a path must "
            "stay inside the uploaded folder (for example ./vendor/mylib)."
        )
    if not os.path.exists(real):
        raise BuildError(f"{where}: {shown} is not in the uploaded source; check the path (and .gitignore).")
    rel = os.path.relpath(real, root)
    if rel not in local:
        local.append(rel)
    return src if rel == "." else f"{src}/{rel}"


def _quote(text: str) -> str:
    return repr(text) if len(text) <= _SHOWN else repr(text[:_SHOWN]) + "..."
