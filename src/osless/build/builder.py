"""The builder: source archive → code layer + dependency layer + app manifest → image.

Synchronous on purpose: the API runs it in a worker thread and hands `log` a line at a time, so
subprocess output is streamed line by line as it comes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from osless.build.images import ImageStore, sha256_hex
from osless.build.source import SourceError, unpack
from osless.sdk.app import read_volumes
from osless.sdk.errors import UsageError

__all__ = ["MAX_SOURCE_BYTES", "MAX_SOURCE_FILES", "BuildError", "BuildResult", "Builder"]

MAX_SOURCE_BYTES = 200 * 1024 * 1024
MAX_SOURCE_FILES = 20_000
INSPECT_TIMEOUT_S = 60.0
RESOLVE_TIMEOUT_S = 600.0
INSTALL_TIMEOUT_S = 1800.0
_TAIL_LINES = 6
# PEP 508 name at the start of a requirement; the rest (extras, versions, markers) is uv's business.
_REQ_NAME_RE = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")

Log = Callable[[str], None]


class BuildError(Exception):
    """A build failed; the message says what failed and how to fix it."""


@dataclass(frozen=True)
class BuildResult:
    image: str
    manifest: dict[str, Any]
    deps_cached: bool
    seconds: float


@dataclass
class _Run:
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


class Builder:
    """Builds images into `images` with `python` (the instances' interpreter) and `uv`."""

    def __init__(
        self,
        images: ImageStore,
        *,
        python: str = sys.executable,
        uv: str | None = None,
        sandbox: Callable[..., dict[str, Any]] | None = None,
    ) -> None:
        """`sandbox(code_layer, deps_layer, uid=N)`, when given, is the sandbox spec the app's
        import runs in."""
        self.images = images
        self.python = python
        self.sandbox = sandbox
        self.uv = uv if uv is not None else _default_uv()
        self.locks_dir = images.root / "locks"
        self.locks_dir.mkdir(parents=True, exist_ok=True)
        self._python_version: str | None = None

    def build(
        self, archive: bytes, log: Log, *, app_name: str | None = None, uid: int | None = None
    ) -> BuildResult:
        """Build an image from a source archive made by `source.pack`; raise BuildError on failure."""
        started = time.monotonic()
        log_lock = threading.Lock()

        def safe_log(line: str) -> None:
            # Subprocess pipes are read on two threads; the caller's log need not be thread-safe.
            with log_lock:
                log(line)

        py = self.python_version()
        code = self._code_layer(archive, safe_log)
        requirements = _read_requirements(code, safe_log)
        lock = self._lock(requirements, py, safe_log)
        deps_digest = sha256_hex(f"{lock}\npython={py}".encode())
        deps_cached = self.images.has_layer(deps_digest)
        if deps_cached:
            safe_log(f"==> Dependencies: cached {deps_digest[:12]}")
            deps = self.images.layer_path(deps_digest)
        else:
            deps = self._deps_layer(deps_digest, lock, safe_log)
        app, entry = self._inspect(code, deps, safe_log, uid)
        volumes = _volumes(app.get("volumes"))
        name = app["name"]
        if app_name is not None and app_name != name:
            safe_log(f"==> App name: deploying as {app_name!r} (the code says App({name!r}))")
            name = app_name
        manifest: dict[str, Any] = {
            "schema": 1,
            "app": name,
            "entry": entry,
            "python": py,
            "layers": {"code": code.name, "deps": deps_digest},
            "lock": lock,
            "functions": app["functions"],
            "web": app["web"],
            "volumes": volumes,
            "egress": app.get("egress") or [],
            "config": app.get("config") or {},
        }
        # No timestamp: the image digest must depend on the content alone.
        try:
            image = self.images.put_manifest(manifest)
        except OSError as e:
            raise BuildError(f"Could not store the image manifest: {e}. Check the image store's disk.") from e
        safe_log(f"==> Image sha256:{image}")
        return BuildResult(
            image=image, manifest=manifest, deps_cached=deps_cached, seconds=time.monotonic() - started
        )

    def python_version(self) -> str:
        """major.minor of the target interpreter (asked once, it may not be the builder's own)."""
        if self._python_version is None:
            if os.path.realpath(self.python) == os.path.realpath(sys.executable):
                self._python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
            else:
                try:
                    out = subprocess.run(
                        [self.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                        capture_output=True,
                        text=True,
                        timeout=30,
                        check=True,
                    )
                except (OSError, subprocess.SubprocessError) as e:
                    raise BuildError(
                        f"cannot run the Python interpreter {self.python!r} ({e}); "
                        "check the builder's python setting"
                    ) from e
                self._python_version = out.stdout.strip()
        return self._python_version

    # -- steps ---------------------------------------------------------------------------------

    def _code_layer(self, archive: bytes, log: Log) -> Path:
        digest = sha256_hex(archive)
        if self.images.has_layer(digest):
            log(f"==> Code: cached {digest[:12]}")
            return self.images.layer_path(digest)
        log(f"==> Code: unpacking {len(archive)} bytes into layer {digest[:12]}")
        try:
            return self.images.add_layer(
                digest, lambda d: unpack(archive, d, max_bytes=MAX_SOURCE_BYTES, max_files=MAX_SOURCE_FILES)
            )
        except SourceError as e:
            raise BuildError(f"The source archive was refused: {e}.") from e
        except OSError as e:
            raise BuildError(f"Could not store the code layer: {e}. Check the image store's disk.") from e

    def _lock(self, requirements: list[str], py: str, log: Log) -> str:
        if not requirements:
            return ""
        text = "".join(f"{r}\n" for r in requirements)
        key = sha256_hex(f"{text}\npython={py}".encode())
        cached = self.locks_dir / f"{key}.txt"
        # Keyed by the requirements text: an unchanged requirements list is not resolved again, so
        # unpinned names keep their first resolution until the list changes.
        if cached.is_file():
            log("==> Resolving dependencies (cached)")
            return cached.read_text(encoding="utf-8")
        count = f"{len(requirements)} requirement{'s' if len(requirements) > 1 else ''}"
        log(f"==> Resolving dependencies ({count}, Python {py})")
        cmd = [self._uv(), "pip", "compile", "-", "--python-version", py]
        cmd += ["--no-header", "--no-annotate", "--quiet"]
        run = _run(
            cmd,
            log,
            stdin=text,
            timeout=RESOLVE_TIMEOUT_S,
            cwd=self.images.tmp_dir,
            env=_uv_env(),
            stdout_prefix="    ",
        )
        if run.timed_out:
            raise BuildError(
                f"Resolving dependencies took longer than {RESOLVE_TIMEOUT_S:.0f} s and was stopped. "
                "Check that the package index is reachable, or pin versions to make resolution easier."
            )
        if run.returncode != 0:
            raise BuildError(
                "Resolving dependencies failed:\n"
                + _tail(run.stderr_lines)
                + "\nCheck the package names and versions in your requirements, then deploy again."
            )
        _write_atomic(cached, run.stdout, self.images.tmp_dir)
        return run.stdout

    def _deps_layer(self, digest: str, lock: str, log: Log) -> Path:
        if not lock.strip():
            log(f"==> Dependencies: none (empty layer {digest[:12]})")
            return self._add_layer(digest, lambda d: None, "dependency")
        log(f"==> Installing dependencies into layer {digest[:12]}")

        def fill(target: Path) -> None:
            with tempfile.TemporaryDirectory(prefix="lock-", dir=self.images.tmp_dir) as tmp:
                lock_file = Path(tmp) / "requirements.txt"
                lock_file.write_text(lock, encoding="utf-8")
                # copy: the default hardlinks into uv's cache, and sealing the layer read-only would
                # then change the cache's files too. Bytecode is compiled now because the layer is
                # read-only and every zygote would otherwise recompile it.
                run = _run(
                    [
                        self._uv(),
                        "pip",
                        "install",
                        "--target",
                        str(target),
                        "--python",
                        self.python,
                        "--link-mode",
                        "copy",
                        "--compile-bytecode",
                        "-r",
                        str(lock_file),
                    ],
                    log,
                    timeout=INSTALL_TIMEOUT_S,
                    cwd=self.images.tmp_dir,
                    env=_uv_env(),
                    stdout_prefix="",
                )
            if run.timed_out:
                raise BuildError(
                    f"Installing dependencies took longer than {INSTALL_TIMEOUT_S:.0f} s and was stopped. "
                    "Check that the package index is reachable."
                )
            if run.returncode != 0:
                raise BuildError(
                    "Installing dependencies failed:\n"
                    + _tail(run.stderr_lines)
                    + "\nA package may not support Python "
                    + self.python_version()
                    + " on this platform, or need a compiler to build; pin a version that ships a wheel."
                )

        return self._add_layer(digest, fill, "dependency")

    def _add_layer(self, digest: str, fill: Callable[[Path], None], what: str) -> Path:
        try:
            return self.images.add_layer(digest, fill)
        except OSError as e:
            raise BuildError(f"Could not store the {what} layer: {e}. Check the image store's disk.") from e

    def _inspect(self, code: Path, deps: Path, log: Log, uid: int | None) -> tuple[dict[str, Any], str]:
        try:
            from osless.runtime.loader import find_entry

            entry = find_entry(str(code))
        except Exception as e:  # the loader's errors already say how to fix them
            raise BuildError(f"Could not find the app's entry module: {e}") from e
        log(f"==> Inspecting the app (entry module {entry!r})")
        cmd = [
            self.python,
            "-s",
            "-P",
            "-m",
            "osless.runtime.inspect",
            "--code",
            str(code),
            "--deps",
            str(deps),
            "--entry",
            entry,
        ]
        if self.sandbox is not None:
            # Not even an import at build time runs outside a sandbox.
            if uid is None:
                raise BuildError("internal error: a sandboxed build needs a uid")
            spec = json.dumps(self.sandbox(code, deps, uid=uid))
            cmd = [self.python, "-s", "-P", "-m", "osless.runtime.jail", spec, "--", *cmd]
        run = _run(cmd, log, timeout=INSPECT_TIMEOUT_S, cwd=Path("/"), env=_inspect_env(), stdout_prefix=None)
        if run.timed_out:
            raise BuildError(
                f"Importing the app took longer than {INSPECT_TIMEOUT_S:.0f} s and was stopped. "
                "Move slow work (network calls, model loading) out of module import, into the functions "
                "or the web app factory."
            )
        if run.returncode != 0:
            raise BuildError(
                f"Importing the app (module {entry!r}) failed:\n"
                + _tail(run.stderr_lines)
                + "\nThe full traceback is in the build log. Fix the error and deploy again."
            )
        lines = [ln for ln in run.stdout.splitlines() if ln.strip()]
        try:
            out = json.loads(lines[-1])
            app = out["app"]
            if not isinstance(app, dict) or not isinstance(app.get("name"), str):
                raise TypeError("no app name")
            app.setdefault("functions", {})
            app.setdefault("web", None)
            entry = str(out.get("entry", entry))
        except (IndexError, ValueError, KeyError, TypeError) as e:
            shown = lines[-1][:200] if lines else "(nothing)"
            raise BuildError(
                f"The app inspector printed {shown!r} instead of the app's manifest ({e}). "
                "Make sure the app does not print to stdout at import time, then deploy again."
            ) from e
        return app, entry

    def _uv(self) -> str:
        if self.uv is None:
            raise BuildError(
                "uv was not found next to the Python interpreter nor on PATH; install it "
                "(pip install uv) to build apps with dependencies."
            )
        return self.uv


def _volumes(raw: object) -> dict[str, Any]:
    """`{"/data": {"name", "size_mb"}}`, checked here too: the app's own process printed them."""
    try:
        return {path: v.manifest() for path, v in read_volumes(raw).items()}
    except UsageError as e:
        raise BuildError(f"The app declares bad volumes: {str(e)[:300]}. Fix App(volumes=...).") from e


def _default_uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def _read_requirements(code: Path, log: Log) -> list[str]:
    """The app's requirements: pyproject `[project].dependencies`, else requirements.txt, else none."""
    reqs: list[str] | None = None
    pyproject = code / "pyproject.toml"
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BuildError(f"pyproject.toml is not valid TOML ({e}); fix it and deploy again.") from e
        project = data.get("project")
        deps = project.get("dependencies") if isinstance(project, dict) else None
        if deps is not None:
            if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
                raise BuildError(
                    "pyproject.toml [project].dependencies must be a list of requirement strings, "
                    'like dependencies = ["requests>=2"].'
                )
            log("==> Requirements: pyproject.toml [project].dependencies")
            reqs = [d.strip() for d in deps if d.strip()]
    if reqs is None:
        req_file = code / "requirements.txt"
        if not req_file.is_file():
            log("==> Requirements: none (no pyproject.toml dependencies, no requirements.txt)")
            return []
        log("==> Requirements: requirements.txt")
        reqs = _parse_requirements_txt(req_file.read_text(encoding="utf-8", errors="replace"))
    kept = []
    for req in reqs:
        m = _REQ_NAME_RE.match(req)
        if m and re.sub(r"[-_.]+", "-", m.group(1)).lower() == "osless":
            log(f"==> Requirements: dropping {req!r}: the platform provides osless itself")
            continue
        kept.append(req)
    return kept


def _parse_requirements_txt(text: str) -> list[str]:
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
                f"requirements.txt line {number}: {line!r} is not supported; options such as -r, -e, "
                "-c and --index-url are not allowed. List each requirement on its own line "
                "(for example requests>=2)."
            )
        reqs.append(line)
    return reqs


def _uv_env() -> dict[str, str]:
    env = dict(os.environ)
    # The builder's own virtualenv must not leak into the app's resolution or install.
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME", "UV_SYSTEM_PYTHON"):
        env.pop(var, None)
    env["NO_COLOR"] = "1"
    return env


def _inspect_env() -> dict[str, str]:
    # What an instance gets, no more: the platform's own environment (tokens, credentials) stays out.
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    # The layers are read-only: do not even try to write bytecode into them.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(
    cmd: Sequence[str],
    log: Log,
    *,
    timeout: float,
    cwd: Path,
    env: dict[str, str],
    stdin: str | None = None,
    stdout_prefix: str | None = "",
) -> _Run:
    """Run `cmd`, logging each stderr line (and stdout line, if `stdout_prefix` is not None) as it comes."""
    try:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            start_new_session=True,  # so a timeout kills the whole tree, not only the direct child
        )
    except OSError as e:
        raise BuildError(f"Could not run {cmd[0]!r}: {e}.") from e
    with _running_lock:
        _running.add(proc)
    try:
        return _collect(proc, log, timeout=timeout, stdin=stdin, stdout_prefix=stdout_prefix)
    finally:
        with _running_lock:
            _running.discard(proc)


# Every build subprocess, so that a stopping platform can end them (they have sessions of their own).
_running: set[subprocess.Popen[str]] = set()
_running_lock = threading.Lock()


def stop_all_builds() -> None:
    """Kill every running build step; their builds fail at once."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _collect(
    proc: subprocess.Popen[str], log: Log, *, timeout: float, stdin: str | None, stdout_prefix: str | None
) -> _Run:
    out: list[str] = []
    err: list[str] = []

    def pump(stream: IO[str], sink: list[str], prefix: str | None) -> None:
        for line in stream:
            sink.append(line)
            if prefix is not None:
                log(prefix + line.rstrip("\r\n"))

    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=pump, args=(proc.stdout, out, stdout_prefix), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err, ""), daemon=True),
    ]
    for t in readers:
        t.start()
    if stdin is not None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(stdin)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    returncode: int | None
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        returncode = None
    for t in readers:
        # Bounded: a grandchild that escaped the process group could hold the pipes open.
        t.join(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.close()
    return _Run(returncode, "".join(out), [ln.rstrip("\r\n") for ln in err])


def _tail(lines: list[str]) -> str:
    # importlib's own frames say nothing about the app's error; the full traceback is in the log anyway.
    kept = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith('File "<frozen importlib')]
    if not kept:
        return "    (no error output)"
    return "\n".join("    " + ln for ln in kept[-_TAIL_LINES:])


def _write_atomic(path: Path, text: str, tmp_dir: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", dir=tmp_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
