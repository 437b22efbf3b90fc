"""The runtime layer: what must be inside an instance besides the app, copied out of the platform's
install into a folder of its own, so that an app imports its own packages and never the platform's.

An instance's (and a build's import and build steps') import path is the app's code layer, its
dependency layer, the interpreter's stdlib and, last, this layer: `osless.runtime` and `osless.sdk`
(nothing else of osless) and the distributions they import (`DISTRIBUTIONS`). The platform's
virtualenv is never bound into a sandbox. The folder is `<folder>/<sha256>`, the digest of every file
it holds and of the interpreter, so an upgrade of the platform (or of one of these packages) makes a
new one and nothing running changes under its feet; made in a scratch folder and renamed into place,
compiled to bytecode (the runtime runs with -B: nothing writes into it), read-only.
"""

from __future__ import annotations

import compileall
import contextlib
import hashlib
import importlib.metadata
import os
import re
import shutil
import stat
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DISTRIBUTIONS", "RuntimeLayer", "hidden_site_packages", "interpreter", "runtime_layer"]

# What the runtime imports, found by importing it (tests/test_runtime_layer.py holds the list to it):
# uvicorn's server with its httptools protocol (runtime.http), click (uvicorn imports it whatever it
# runs), websockets (uvicorn's ws="auto" for web apps), uvloop (the instances' loop when present),
# a2wsgi (WSGI apps) and pyseccomp (the sandbox's filter). Not h11, watchfiles, PyYAML or
# python-dotenv: uvicorn brings them for its other protocol, its reloader and its config files,
# which never run here. debugpy: imported only when a debug session asks (runtime/debugger.py).
DISTRIBUTIONS = (
    "a2wsgi",
    "click",
    "httptools",
    "pyseccomp",
    "uvicorn",
    "uvloop",
    "websockets",
    # Spans (runtime.tracing): the SDK, imported by each release zygote after its app, and the OTLP
    # exporter with what it imports, only in an instance whose app sets OTEL_EXPORTER_OTLP_ENDPOINT.
    "opentelemetry-api",
    "opentelemetry-sdk",
    "opentelemetry-semantic-conventions",
    "typing_extensions",
    "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-http-transport",
    "opentelemetry-proto",
    "protobuf",
    "googleapis-common-protos",
    "requests",
    "urllib3",
    "idna",
    "charset-normalizer",
    "certifi",
    "debugpy",
)
# Used when installed (uvicorn and the instance check), left out when not; the last two are parts of
# the exporter only in its newer releases.
_OPTIONAL = (
    "uvloop",
    "websockets",
    "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-http-transport",
)
_NOT_COMPILED = re.compile(r"/debugpy/")
# Of osless itself: the SDK that app code imports and the runtime that runs it, no more.
_OSLESS = ("__init__.py", "py.typed", "runtime", "sdk")
# Runs a module of the layer with nothing else on the path: `python -I -S -c _BOOT LAYER MODULE ARGS...`.
_BOOT = (
    "import sys, runpy; sys.path.append(sys.argv[1]); module = sys.argv[2]; del sys.argv[1:3]; "
    "runpy.run_module(module, run_name='__main__', alter_sys=True)"
)


def interpreter() -> str:
    """The interpreter itself, not the platform's virtualenv's link to it: started through the venv's
    link, Python would find the venv's pyvenv.cfg and take its prefix."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@dataclass(frozen=True)
class RuntimeLayer:
    path: Path
    python: str  # the interpreter, as `interpreter()` gives it

    @property
    def bin(self) -> Path:
        """A folder holding `python` and `python3` (links to the interpreter), for build steps' PATH."""
        return self.path / "bin"

    def command(self, module: str, *args: str) -> list[str]:
        """Run `module` of the layer with sys.path = the stdlib and the layer: -I (no environment, no
        user site, no current folder), -S (no site-packages at all), -B (never write bytecode: root
        runs it, and would write into the layer), -u (each line out as it is printed)."""
        return [self.python, "-I", "-S", "-B", "-u", "-c", _BOOT, str(self.path), module, *args]


def runtime_layer(folder: Path) -> RuntimeLayer:
    """The runtime layer of this install under `folder`, made unless it is there already."""
    python = interpreter()
    files = _files()
    digest = hashlib.sha256(f"python={python} {sys.version}\n".encode())
    for rel, source in files:
        digest.update(f"{rel}\0{_sha256(source)}\n".encode())
    final = folder / digest.hexdigest()
    layer = RuntimeLayer(final, python)
    _prune(folder, keep=final.name)
    if final.is_dir():
        return layer
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".runtime-", dir=folder))
    try:
        for rel, source in files:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)  # copies: a hard link would change with the platform's files
        (tmp / "bin").mkdir()
        for name in ("python", "python3"):
            os.symlink(python, tmp / "bin" / name)
        # Compiled as if at its final path: tracebacks name the files where they are read. Not
        # debugpy: 3 s of each layer's making (every node's and builder's start), for 2 s saved at
        # the start of a debug session, which is rare.
        if not compileall.compile_dir(tmp, ddir=str(final), quiet=1, workers=1, rx=_NOT_COMPILED):
            raise OSError(f"could not compile the runtime layer in {tmp}")
        _seal(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            _remove(tmp)  # another process made the same one meanwhile: equal digests, equal files
        else:
            os.chmod(final, 0o555)
    except BaseException:
        _remove(tmp)
        raise
    return layer


def _prune(folder: Path, keep: str) -> None:
    """Remove the layers of earlier installs: a folder is one node's or one builder's (which holds a
    lock on it), and their processes, started from this install, use this one alone."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name != keep and entry.is_dir() and not entry.is_symlink():
            _remove(entry)


def _files() -> list[tuple[str, Path]]:
    """(path in the layer, file on this host) of everything the layer holds, sorted."""
    out: dict[str, Path] = {}
    for name in DISTRIBUTIONS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name in _OPTIONAL:
                continue
            raise RuntimeError(
                f"osless's runtime needs {name}, which is not installed here: reinstall osless"
            ) from None
        for entry in dist.files or []:
            parts = entry.parts
            # Scripts (`../../bin/uvicorn`) and bytecode: the layer compiles its own.
            if not parts or parts[0] == ".." or "__pycache__" in parts or entry.suffix == ".pyc":
                continue
            source = Path(str(dist.locate_file(entry)))
            if source.is_file():
                out[entry.as_posix()] = source
    import osless

    package = Path(osless.__file__).parent
    for name in _OSLESS:
        top = package / name
        found = sorted(top.rglob("*.py")) + sorted(top.rglob("py.typed")) if top.is_dir() else [top]
        for source in found:
            if source.is_file() and "__pycache__" not in source.parts:
                out[f"osless/{source.relative_to(package).as_posix()}"] = source
    return sorted(out.items())


def hidden_site_packages() -> list[str]:
    """Where the interpreter keeps packages besides the stdlib (its own site-packages, the platform's
    virtualenv, a distribution's dist-packages): never shown in a sandbox, though /usr and the
    interpreter's prefix are."""
    base = {"base": sys.base_prefix, "platbase": sys.base_prefix}
    paths = {sysconfig.get_path(kind, vars=base) for kind in ("purelib", "platlib")}
    if sys.prefix != sys.base_prefix:
        paths.add(sys.prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for lib in ("/usr/lib", "/usr/local/lib"):
        paths.update({f"{lib}/python3/dist-packages", f"{lib}/{version}/dist-packages"})
        paths.add(f"{lib}/{version}/site-packages")
    return sorted(os.path.realpath(p) for p in paths if p and os.path.isdir(p))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _seal(top: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                mode = os.lstat(path).st_mode
                os.chmod(path, 0o555 if mode & 0o111 else 0o444)
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o555)
    os.chmod(top, 0o755)  # renamed into place after: a folder's rename needs write access to it


def _remove(top: Path) -> None:
    for dirpath, _, _ in os.walk(top):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, stat.S_IRWXU)
    shutil.rmtree(top, ignore_errors=True)
