"""The builder: source archive → code layer + dependency layer + app manifest → image.

Synchronous on purpose: the API runs it in a worker thread and hands `log` a line at a time, so
subprocess output is streamed line by line as it comes.

Every step that may run the app's code or its dependencies' (resolving, whose sdists' setup.py run
to give their metadata; installing, which builds them; importing the app) runs in a sandbox of its
own (`python -m osless.runtime.jail`) as the app's own uid, when the builder has a `sandbox`:
- the app's name is read from its entry module before anything runs (`appname`), and its uid asked
  for that name (`uid_for`); after the import, an app whose name is not that one fails the build;
- uv runs with `--no-config` and `--no-sources`, a minimal environment, in a neutral folder, and
  reaches the network only through the build's egress (`egress`): the package index and no more;
- what it writes is bound writable at fixed paths (`/build/...`): the app's own uv cache, the
  build's scratch (TMPDIR, and the copies of the source's local packages), and the layer being
  installed, owned by the app's uid during the build and taken over by the image store after it;
- uv's cache, the lock cache and dependency layers are the app's own (keyed by its uid): a layer
  ran its app's build code, so no other app may ever reuse it.
Without a sandbox (`osless up --no-sandbox`, or a host without the protections) the same steps run
on the host, as the platform's user, as they did before builds were sandboxed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from osless import schedules
from osless.builder.appname import read_app_name
from osless.builder.hints import missing_module, relative
from osless.builder.process import STDOUT_CHARS, BuildError, Log, Run, run, tail
from osless.builder.requirements import Requirements, read_requirements
from osless.builder.source import SourceError, unpack
from osless.contracts import ImageManifest, manifest_problem
from osless.images import MAX_MANIFEST_BYTES, ImageStore, ManifestTooLarge, UidFolders, sha256_hex
from osless.images.runtime import RuntimeLayer, interpreter, runtime_layer
from osless.sdk.app import read_app_manifest
from osless.sdk.errors import UsageError

__all__ = [
    "BUILD_NPROC",
    "MAX_SOURCE_BYTES",
    "MAX_SOURCE_FILES",
    "BuildError",
    "BuildResult",
    "Builder",
    "Egress",
    "SandboxMaker",
]

MAX_SOURCE_BYTES = 200 * 1024 * 1024
MAX_SOURCE_FILES = 20_000
INSPECT_TIMEOUT_S = 60.0
RESOLVE_TIMEOUT_S = 600.0
INSTALL_TIMEOUT_S = 1800.0
BUILD_STEP_TIMEOUT_S = 600.0  # each of the app's build commands
# Processes and threads of one build sandbox: uv's own threads scale with the host's cores, a fork
# bomb in a setup.py stops here (`runtime.jail --nproc`).
BUILD_NPROC = 1024
# Where a sandboxed step sees its folders: fixed, so that a lock naming a local package reads the
# same in every build.
_INSIDE = "/build"
# What uv may take from the platform's environment: its index and TLS settings, nothing else.
_UV_ENV = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "UV_NATIVE_TLS",
    "UV_SYSTEM_CERTS",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_INDEX",
    "UV_INDEX_STRATEGY",
    "UV_HTTP_TIMEOUT",
    "UV_CONCURRENT_DOWNLOADS",
    "UV_CONCURRENT_BUILDS",
    "UV_CONCURRENT_INSTALLS",
)


class SandboxMaker(Protocol):
    """The sandbox spec (JSON) of one build step: `osless.node.isolation.build_spec`, bound to a node."""

    def __call__(
        self, *, uid: int, readonly: list[Path], volumes: dict[str, Path], egress_socket: Path | None
    ) -> dict[str, Any]: ...


class Egress(Protocol):
    """Egress sockets to the package index, one per step: `osless.builder.egress.BuildEgress`."""

    def socket(self, uid: int, log: Log) -> AbstractContextManager[Path]: ...


@dataclass(frozen=True)
class BuildResult:
    image: str
    manifest: ImageManifest
    deps_cached: bool
    seconds: float


@dataclass(frozen=True)
class _Scratch:
    """One build's folders on the host, and the paths its steps see them at."""

    src: Path  # copies of the source's local packages (building one writes into its folder)
    tmp: Path  # TMPDIR: on disk, where a sandbox's /tmp is a small tmpfs
    cache: Path  # uv's cache: the app's own
    inside: str | None  # the folder the steps see these in; None: on the host, at their own paths

    def path(self, name: str) -> str:
        return f"{self.inside}/{name}" if self.inside else str(getattr(self, name))

    def to_lock(self, text: str) -> str:
        """`text` with the host's source copy named as in a sandbox: a lock reads the same either way."""
        return text if self.inside else text.replace(str(self.src), f"{_INSIDE}/src")

    def from_lock(self, text: str) -> str:
        return text if self.inside else text.replace(f"{_INSIDE}/src", str(self.src))


class Builder:
    """Builds images into `images` with `python` (the instances' interpreter; default: the one this
    runs on, outside its virtualenv) and `uv`.

    `sandbox` and `egress`: how steps run sandboxed (`osless up` passes both); without `sandbox`
    they run on the host. `cache_dir`: where each app's uv cache goes. `runtime`: the runtime layer
    the app is imported with (default: made beside the image store), as an instance has it."""

    def __init__(
        self,
        images: ImageStore,
        *,
        python: str | None = None,
        uv: str | None = None,
        sandbox: SandboxMaker | None = None,
        egress: Egress | None = None,
        cache_dir: Path | None = None,
        nproc: int = BUILD_NPROC,
        runtime: RuntimeLayer | None = None,
    ) -> None:
        self.images = images
        self.runtime = runtime if runtime is not None else runtime_layer(images.root.parent / "runtime")
        # The interpreter itself, not the platform's virtualenv's link to it, which no sandbox shows.
        self.python = python if python is not None else interpreter()
        self.sandbox = sandbox
        self.egress = egress
        self.nproc = nproc
        self.uv = uv if uv is not None else _default_uv()
        self.locks_dir = images.locks_dir
        self.cache_dir = cache_dir if cache_dir is not None else images.root.parent / "cache" / "uv"
        self.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.uid_folders = UidFolders()
        self._python_version: str | None = None

    def build(
        self,
        archive: bytes,
        log: Log,
        *,
        app_name: str | None = None,
        uid_for: Callable[[str], int] | None = None,
    ) -> BuildResult:
        """Build an image from a source archive made by `source.pack`; raise BuildError on failure.

        `app_name` overrides the name in the code. `uid_for(name)` gives the app's uid, which its
        steps run as (required with a sandbox)."""
        started = time.monotonic()
        log_lock = threading.Lock()

        def safe_log(line: str) -> None:
            # Subprocess pipes are read on two threads; the caller's log need not be thread-safe.
            with log_lock:
                log(line)

        py = self.python_version()
        code = self._code_layer(archive, safe_log)
        entry = _entry(code)
        name = app_name if app_name is not None else read_app_name(code, entry)
        uid = uid_for(name) if uid_for is not None else None
        if self.sandbox is not None and uid is None:
            raise BuildError("internal error: a sandboxed build needs the app's uid")
        safe_log(f"==> Building {name}" + (f" (sandboxed, uid {uid})" if self.sandbox is not None else ""))
        # The uid's uv cache and locks are this build's while it uses them: the sweep leaves them.
        with self.uid_folders.using(uid), self.images.scratch("build-") as folder:
            scratch = self._scratch(folder, uid)
            reqs = read_requirements(code, safe_log, src=scratch.path("src"))
            self._copy_local(code, reqs, scratch, uid)
            lock = self._lock(reqs, py, uid, scratch, safe_log)
            key = f"{lock}\npython={py}"
            if uid is not None:
                key += f"\nuid={uid}"  # a layer ran its app's build code: never another app's
            if reqs.local:
                key += f"\ncode={code.name}"  # local packages are part of the code
            deps_digest = sha256_hex(key.encode())
            deps_cached = self.images.has_layer(deps_digest)
            if deps_cached:
                safe_log(f"==> Dependencies: cached {deps_digest[:12]}")
                deps = self.images.layer_path(deps_digest)
            else:
                deps = self._deps_layer(deps_digest, lock, uid, scratch, safe_log)
        app, entry = self._inspect(code, deps, entry, uid, safe_log)
        said = str(app["name"])[:50]  # the inspector's output: the app could have printed it
        if app_name is not None:
            if app["name"] != app_name:
                safe_log(f"==> App name: deploying as {app_name!r} (the code says App({said!r}))")
        elif app["name"] != name:
            raise BuildError(
                f"The app's name is {said!r} once imported, but the build read App({name!r}) from "
                f"the entry module and ran as that app. Give App(...) its name as a literal, "
                f"or pass --name {said}."
            )
        if app["build"]:
            # Declared in the manifest, so known only now: deps installed, app imported.
            code = self._build_steps(code, deps_digest, app["build"], uid, safe_log)
        fields: dict[str, Any] = {
            "schema": 1,
            "app": name,
            "entry": entry,
            "python": py,
            "layers": {"code": code.name, "deps": deps_digest},
            # What a node pulls and checks: the image digest covers these sha256s.
            "layer_archives": self._archives({"code": code.name, "deps": deps_digest}),
            "lock": lock,
            "functions": app["functions"],
            "web": app["web"],
            "volumes": app["volumes"],
            "egress": app["egress"],
            "config": app["config"],
            # Only when declared: an image without release steps keeps the digest it had before them.
            **({"release": app["release"]} if app.get("release") else {}),
            **({"schedules": app["schedules"]} if app.get("schedules") else {}),
            **({"consumers": app["consumers"]} if app.get("consumers") else {}),
        }
        try:  # the SDK checked the app's part; this is the contract every reader holds it to
            manifest = ImageManifest.model_validate(fields)
        except ValidationError as e:
            raise BuildError(
                f"The app's manifest is refused: {manifest_problem(e)}. Fix the App(...) declarations."
            ) from e
        # No timestamp: the image digest must depend on the content alone.
        try:
            image = self.images.put_manifest(manifest)
        except ManifestTooLarge as e:
            raise BuildError(
                f"The app's manifest is too large: {e}. Declare fewer functions, shorten config "
                "descriptions and defaults, or depend on fewer packages, then deploy again."
            ) from e
        except OSError as e:
            raise BuildError(f"Could not store the image manifest: {e}. Check the image store's disk.") from e
        safe_log(f"==> Image sha256:{image}")
        return BuildResult(
            image=image, manifest=manifest, deps_cached=deps_cached, seconds=time.monotonic() - started
        )

    def _archives(self, layers: dict[str, str]) -> dict[str, dict[str, Any]]:
        try:
            return {name: self.images.layer_archive(layer).to_json() for name, layer in layers.items()}
        except OSError as e:
            raise BuildError(f"Could not archive the layers: {e}. Check the image store's disk.") from e

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
        # Shared by apps that upload the same bytes: unpacking runs none of their code.
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

    def _scratch(self, folder: Path, uid: int | None) -> _Scratch:
        owner = uid if self.sandbox is not None else None
        cache = _owned(self.cache_dir / (str(uid) if owner is not None else "host"), owner)
        return _Scratch(
            src=_owned(folder / "src", owner),
            tmp=_owned(folder / "tmp", owner),
            cache=cache,
            inside=_INSIDE if self.sandbox is not None else None,
        )

    def _copy_local(self, code: Path, reqs: Requirements, scratch: _Scratch, uid: int | None) -> None:
        """Copy the local packages the requirements name, writable by the build (the layer is not)."""
        for rel in reqs.local:
            source, dest = code / rel, scratch.src / rel
            if source.is_dir():
                shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest)
        owner = uid if self.sandbox is not None else None
        for dirpath, dirnames, filenames in os.walk(scratch.src):
            for name in (*dirnames, *filenames):
                path = os.path.join(dirpath, name)
                if owner is not None:
                    os.chown(path, owner, owner, follow_symlinks=False)
                if not os.path.islink(path):
                    os.chmod(path, os.lstat(path).st_mode | 0o200)

    def _lock(self, reqs: Requirements, py: str, uid: int | None, scratch: _Scratch, log: Log) -> str:
        if not reqs.lines:
            return ""
        text = reqs.text
        # Per app: a resolution may run an sdist's setup.py (for its metadata), which may shape it.
        locks = self.locks_dir / (str(uid) if uid is not None else "host")
        locks.mkdir(mode=0o700, exist_ok=True)
        key = sha256_hex(f"{text}\npython={py}".encode())
        cached = locks / f"{key}.txt"
        # Keyed by the requirements text: an unchanged requirements list is not resolved again, so
        # unpinned names keep their first resolution until the list changes. Not with local packages:
        # their content, and so their dependencies, can change with the code.
        if not reqs.local and cached.is_file():
            log("==> Resolving dependencies (cached)")
            return cached.read_text(encoding="utf-8")
        count = f"{len(reqs.lines)} requirement{'s' if len(reqs.lines) > 1 else ''}"
        log(f"==> Resolving dependencies ({count}, Python {py})")
        cmd = [self._uv(), "pip", "compile", "-", "--python", self.python, "--python-version", py]
        cmd += ["--no-header", "--no-annotate", "--quiet", *_UV_FLAGS]
        result = self._step(
            cmd, log, uid=uid, scratch=scratch, stdin=scratch.from_lock(text), timeout=RESOLVE_TIMEOUT_S
        )
        if result.timed_out:
            raise BuildError(
                f"Resolving dependencies took longer than {RESOLVE_TIMEOUT_S:.0f} s and was stopped. "
                "Check that the package index is reachable, or pin versions to make resolution easier."
            )
        if result.returncode != 0:
            raise BuildError(
                "Resolving dependencies failed:\n"
                + tail(result.stderr_lines)
                + "\nCheck the package names and versions in your requirements, then deploy again."
            )
        if result.stdout_cut:
            raise BuildError(
                f"The resolved dependencies pass {STDOUT_CHARS >> 20} MiB of pinned requirements; "
                "depend on fewer packages."
            )
        lock = scratch.to_lock(result.stdout)
        if not reqs.local:
            _write_atomic(cached, lock, self.images.tmp_dir)
        return lock

    def _deps_layer(self, digest: str, lock: str, uid: int | None, scratch: _Scratch, log: Log) -> Path:
        if not lock.strip():
            log(f"==> Dependencies: none (empty layer {digest[:12]})")
            return self._add_layer(digest, lambda d: None, "dependency")
        log(f"==> Installing dependencies into layer {digest[:12]}")

        def fill(target: Path) -> None:
            if self.sandbox is not None and uid is not None:
                os.chown(target, uid, uid)  # the image store takes it back once filled
            inside = f"{_INSIDE}/layer" if self.sandbox is not None else str(target)
            # copy: the default hardlinks into uv's cache, and sealing the layer read-only would
            # then change the cache's files too. Bytecode is compiled now because the layer is
            # read-only and every zygote would otherwise recompile it.
            cmd = [self._uv(), "pip", "install", "--target", inside, "--python", self.python]
            cmd += ["--link-mode", "copy", "--compile-bytecode", *_UV_FLAGS, "-r", "-"]
            result = self._step(
                cmd,
                log,
                uid=uid,
                scratch=scratch,
                stdin=scratch.from_lock(lock),
                timeout=INSTALL_TIMEOUT_S,
                layer=target,
            )
            if result.timed_out:
                raise BuildError(
                    f"Installing dependencies took longer than {INSTALL_TIMEOUT_S:.0f} s and was stopped. "
                    "Check that the package index is reachable."
                )
            if result.returncode != 0:
                raise BuildError(
                    "Installing dependencies failed:\n"
                    + tail(result.stderr_lines)
                    + "\nA package may not support Python "
                    + self.python_version()
                    + " on this platform, or need a compiler to build; pin a version that ships a wheel."
                )

        return self._add_layer(digest, fill, "dependency")

    def _step(
        self,
        cmd: list[str],
        log: Log,
        *,
        uid: int | None,
        scratch: _Scratch,
        stdin: str,
        timeout: float,
        layer: Path | None = None,
    ) -> Run:
        """Run uv: in a sandbox as the app's uid, with egress to the index only; else on the host."""
        env = {k: os.environ[k] for k in _UV_ENV if k in os.environ}
        tmp = scratch.path("tmp")
        env.update(
            HOME=tmp,  # a sandbox sets its own
            TMPDIR=tmp,
            UV_CACHE_DIR=scratch.path("cache"),
            UV_NO_CONFIG="1",
            UV_PYTHON_DOWNLOADS="never",
            NO_COLOR="1",
        )
        if self.sandbox is None:
            return run(cmd, log, timeout=timeout, cwd=scratch.tmp, env=env, stdin=stdin, stdout_prefix="    ")
        assert uid is not None
        volumes = {
            f"{_INSIDE}/src": scratch.src,
            f"{_INSIDE}/tmp": scratch.tmp,
            f"{_INSIDE}/cache": scratch.cache,
        }
        if layer is not None:
            volumes[f"{_INSIDE}/layer"] = layer
        # The CA bundle uv is told to trust, where the sandbox's own /etc/ssl does not have it.
        certs = [
            Path(env[k]) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if k in env and os.path.exists(env[k])
        ]
        # uv itself: the platform's virtualenv holds it, and no sandbox shows that.
        certs.append(Path(self._uv()))
        egress = self.egress.socket(uid, log) if self.egress is not None else contextlib.nullcontext(None)
        with egress as sock:
            spec = self.sandbox(uid=uid, readonly=certs, volumes=volumes, egress_socket=sock)
            return run(
                self._jail(spec, cmd),
                log,
                timeout=timeout,
                cwd=Path("/"),
                env=env,
                stdin=stdin,
                stdout_prefix="    ",
            )

    def _add_layer(self, digest: str, fill: Callable[[Path], None], what: str) -> Path:
        try:
            return self.images.add_layer(digest, fill)
        except OSError as e:
            raise BuildError(f"Could not store the {what} layer: {e}. Check the image store's disk.") from e

    def _build_steps(
        self, code: Path, deps_digest: str, commands: list[str], uid: int | None, log: Log
    ) -> Path:
        """The code layer after the app's `build` commands ran in a copy of it: a layer of its own.

        Keyed by what shapes it (the code, the dependencies, the commands, the app): the commands
        run again only when one of these changes. The app's uid is in the key because its commands
        ran its code: no other app may ever get this layer."""
        key = f"code={code.name}\ndeps={deps_digest}\nbuild={json.dumps(commands)}\nuid={uid}"
        digest = sha256_hex(key.encode())
        if self.images.has_layer(digest):
            log(f"==> Build steps: cached {digest[:12]}")
            return self.images.layer_path(digest)
        deps = self.images.layer_path(deps_digest)

        def fill(target: Path) -> None:
            shutil.copytree(code, target, symlinks=True, dirs_exist_ok=True)
            # The copy of a sealed layer is read-only: the steps' (the app's uid's) to write now; the
            # image store takes it back and seals it once they are done.
            owner = uid if self.sandbox is not None else None
            for path in (target, *target.rglob("*")):
                if owner is not None:
                    os.chown(path, owner, owner, follow_symlinks=False)
                if not path.is_symlink():
                    path.chmod(path.lstat().st_mode | 0o200)
            with self.images.scratch("steps-") as folder:
                tmp = _owned(folder / "tmp", owner)
                for number, command in enumerate(commands, 1):
                    log(f"==> Build step {number}/{len(commands)}: {command}")
                    self._build_step(command, target, deps, tmp, uid, log)

        return self._add_layer(digest, fill, "code")

    def _build_step(self, command: str, code: Path, deps: Path, tmp: Path, uid: int | None, log: Log) -> None:
        """One build command, in the code folder with the app importable as at run time; writable:
        the code folder and a scratch folder only."""
        inside = self.sandbox is not None
        code_at = f"{_INSIDE}/code" if inside else str(code)
        tmp_at = f"{_INSIDE}/tmp" if inside else str(tmp)
        env = _inspect_env()
        env.update(
            # `python` is the instances' interpreter; the path as an instance's, the runtime last.
            PATH=os.pathsep.join([str(self.runtime.bin), "/usr/local/bin", "/usr/bin", "/bin"]),
            PYTHONPATH=os.pathsep.join([code_at, str(deps), str(self.runtime.path)]),
            PYTHONNOUSERSITE="1",
            HOME=tmp_at,
            TMPDIR=tmp_at,
        )
        # The shell starts in the code folder: the sandbox's own cwd is its root.
        cmd = ["/bin/sh", "-c", f"cd {shlex.quote(code_at)} || exit 125\n{command}"]
        shown = command if len(command) <= 200 else command[:197] + "..."
        if inside:
            assert self.sandbox is not None and uid is not None
            egress = self.egress.socket(uid, log) if self.egress is not None else contextlib.nullcontext(None)
            with egress as sock:
                spec = self.sandbox(
                    uid=uid,
                    readonly=[self.runtime.path, deps],
                    volumes={f"{_INSIDE}/code": code, f"{_INSIDE}/tmp": tmp},
                    egress_socket=sock,
                )
                result = self._run_step(self._jail(spec, cmd), env, Path(code_at), deps, log)
        else:
            result = self._run_step(cmd, env, code, deps, log)
        if result.timed_out:
            raise BuildError(
                f"The build step {shown!r} took longer than {BUILD_STEP_TIMEOUT_S:.0f} s and was stopped."
            )
        if result.returncode != 0:
            failed = f"The build step {shown!r} failed with exit code {result.returncode}"
            hint = missing_module(result.stderr_lines, Path(code_at), code)
            if hint is not None:
                raise BuildError(f"{failed}: {hint}")
            raise BuildError(
                f"{failed}:\n"
                + tail([relative(ln, Path(code_at), deps) for ln in result.stderr_lines[-50:]])
                + "\nIts whole output is in the build log. Fix the command or the code, then deploy again."
            )

    def _run_step(self, cmd: list[str], env: dict[str, str], code: Path, deps: Path, log: Log) -> Run:
        return run(
            cmd,
            lambda line: log(relative(line, code, deps)),
            timeout=BUILD_STEP_TIMEOUT_S,
            cwd=Path("/"),
            env=env,
            stdout_prefix="    ",
        )

    def _inspect(
        self, code: Path, deps: Path, entry: str, uid: int | None, log: Log
    ) -> tuple[dict[str, Any], str]:
        log(f"==> Inspecting the app (entry module {entry!r})")
        # Imported as an instance imports it: its layers, the stdlib and the runtime layer alone.
        cmd = self.runtime.command(
            "osless.runtime.inspect", "--code", str(code), "--deps", str(deps), "--entry", entry
        )
        if self.sandbox is not None:
            assert uid is not None
            # Not even an import at build time runs outside a sandbox.
            readonly = [self.runtime.path, code, deps]
            cmd = self._jail(self.sandbox(uid=uid, readonly=readonly, volumes={}, egress_socket=None), cmd)
        # The traceback's paths as the user's project has them, not the build's layer paths.
        result = run(
            cmd,
            lambda line: log(relative(line, code, deps)),
            timeout=INSPECT_TIMEOUT_S,
            cwd=Path("/"),
            env=_inspect_env(),
            stdout_prefix=None,
        )
        if result.timed_out:
            raise BuildError(
                f"Importing the app took longer than {INSPECT_TIMEOUT_S:.0f} s and was stopped. "
                "Move slow work (network calls, model loading) out of module import, into the functions "
                "or the web app factory."
            )
        if result.returncode != 0:
            hint = missing_module(result.stderr_lines, code)
            if hint is not None:
                raise BuildError(hint)
            raise BuildError(
                f"Importing the app (module {entry!r}) failed:\n"
                + tail([relative(ln, code, deps) for ln in result.stderr_lines[-50:]])
                + "\nThe full traceback is in the build log. Fix the error and deploy again."
            )
        if result.stdout_cut:
            raise BuildError(
                f"The app's manifest passes {STDOUT_CHARS >> 20} MiB (the limit is "
                f"{MAX_MANIFEST_BYTES // 1024} KiB). Declare fewer functions, or shorter config "
                "descriptions and defaults, then deploy again."
            )
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        try:
            out = json.loads(lines[-1])
            raw = out["app"]
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise TypeError("no app name")
        except (IndexError, ValueError, KeyError, TypeError) as e:
            shown = lines[-1][:200] if lines else "(nothing)"
            raise BuildError(
                f"The app inspector printed {shown!r} instead of the app's manifest ({e}). "
                "Make sure the app does not print to stdout at import time, then deploy again."
            ) from e
        # Printed by the app's own process: checked as the SDK checks it, whatever the app did to it
        # (a replaced App.manifest, a write to the real stdout). The entry is the one found here.
        try:
            app = read_app_manifest(raw)
        except UsageError as e:
            raise BuildError(
                f"The app's manifest is refused: {str(e)[:300]}. Fix the App(...) declarations."
            ) from e
        for name, spec in (app.get("schedules") or {}).items():
            try:
                schedules.check(name, spec)
            except ValueError as e:
                raise BuildError(f"@app.schedule: {e}. Fix it, then deploy again.") from e
        return app, entry

    def _jail(self, spec: dict[str, Any], cmd: list[str]) -> list[str]:
        # -I: the jail runs as root on the host; the environment it passes on (a build step's
        # PYTHONPATH names the app's code) must not steer its own imports.
        jail = [sys.executable, "-I", "-m", "osless.runtime.jail", json.dumps(spec)]
        return [*jail, "--nproc", str(self.nproc), "--", *cmd]

    def _uv(self) -> str:
        if self.uv is None:
            raise BuildError(
                "uv was not found next to the Python interpreter nor on PATH; install it "
                "(pip install uv) to build apps with dependencies."
            )
        return self.uv


# uv's configuration files (the app's pyproject.toml [tool.uv], uv.toml) and its sources table must
# not steer a build: where it fetches from is the platform's to say.
_UV_FLAGS = ("--no-config", "--no-sources", "--no-python-downloads")


def _default_uv() -> str | None:
    beside = Path(sys.executable).parent / "uv"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("uv")


def _entry(code: Path) -> str:
    try:
        from osless.runtime.loader import find_entry

        return find_entry(str(code))
    except Exception as e:  # the loader's errors already say how to fix them
        raise BuildError(f"Could not find the app's entry module: {e}") from e


def _owned(path: Path, uid: int | None) -> Path:
    """`path`, made if missing, mode 700, owned by `uid` (None: by us)."""
    path.mkdir(mode=0o700, exist_ok=True)
    if uid is not None:
        os.chown(path, uid, uid)
    path.chmod(0o700)
    return path


def _inspect_env() -> dict[str, str]:
    # What an instance gets, no more: the platform's own environment (tokens, credentials) stays out.
    env = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "TZ") if k in os.environ}
    # The layers are read-only: do not even try to write bytecode into them.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


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
