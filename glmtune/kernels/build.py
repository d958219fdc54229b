"""Compile glmtune's C++ CPU kernels on first use and load them as ``torch.ops.glmtune``.

The system C++ compiler (``$CXX`` or ``c++``) builds one shared library against the running torch (its headers,
``libc10`` and ``libtorch_cpu``, its C++ ABI flag) with ``-O3`` and per-function target attributes instead of
``-march=native``, so one build runs on any x86-64 and each kernel path is chosen at run time from the CPU's
features. The library is cached in ``$GLMTUNE_KERNEL_CACHE`` (default ``~/.cache/glmtune/kernels``) under a hash
of the sources, torch version and compiler version; a file lock makes concurrent processes (pytest-xdist,
torchrun ranks) build it once, and the finished file is renamed into place so no process loads half a library.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("ops.cpp", "quantize.cpp", "quant_avx512.cpp", "quant_avx2.cpp", "bf16_avx512.cpp")
HEADERS = ("kernels.h",)
TORCH_SOURCES = ("ops.cpp",)  # the only file that includes torch headers (slow to compile)
LIBRARY_NAME = "glmtune_cpu_kernels.so"
CACHE_ENV = "GLMTUNE_KERNEL_CACHE"
# A library built beforehand for exactly this torch (e.g. in a container's build stage, where the compiler is):
# loaded as is, so images without a compiler still run the kernels.
LIBRARY_ENV = "GLMTUNE_KERNEL_LIBRARY"


class BuildError(RuntimeError):
    """The kernels cannot be built or loaded here; the message says why."""


def cache_root() -> Path:
    """Where built libraries live: ``$GLMTUNE_KERNEL_CACHE`` or the user's cache folder."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glmtune" / "kernels"


def _compiler() -> list[str]:
    command = shlex.split(os.environ.get("CXX") or "c++")
    if not command or shutil.which(command[0]) is None:
        raise BuildError(f"no C++ compiler: {command[0] if command else '$CXX'!r} not found (set CXX)")
    return command


def _compiler_version(compiler: list[str]) -> str:
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"the C++ compiler {shlex.join(compiler)!r} does not run ({exc})") from exc
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


def _flags(source: str) -> list[str]:
    from torch.utils import cpp_extension

    flags = ["-O3", "-fPIC", "-DNDEBUG", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if source not in TORCH_SOURCES:
        return [*flags, "-std=c++17"]
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    # ATen's parallel_for is an OpenMP region compiled into our code: it must be built with OpenMP to use
    # torch's threads (the process already has torch's libgomp loaded, which the library then binds to)
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    return [*flags, "-std=c++20", "-w", *openmp, *includes]


def _link_flags() -> list[str]:
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() else []
    return ["-shared", *openmp, *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]


def _build_key(compiler: list[str], version: str) -> str:
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    for part in (torch.__version__, version, shlex.join(compiler), repr(_link_flags()),
                 repr([_flags(s) for s in SOURCES])):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def _run(command: list[str], log: list[str]) -> None:
    log.append("$ " + shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    log.append(done.stdout + done.stderr)
    if done.returncode:
        errors = [line for line in (done.stdout + done.stderr).splitlines() if "error" in line.lower()]
        raise BuildError(f"{shlex.join(command[:1])} exited with {done.returncode}: "
                         f"{(errors or ['(no error line)'])[0].strip()}")


def _compile(compiler: list[str], target: Path) -> float:
    """Compile every source in parallel, link into `target` (written elsewhere, then renamed); seconds taken."""
    start = time.perf_counter()
    logs: dict[str, list[str]] = {name: [] for name in (*SOURCES, "link")}
    with tempfile.TemporaryDirectory(dir=target.parent, prefix="build-") as work:
        objects = {name: Path(work) / (name + ".o") for name in SOURCES}
        try:
            # ops.cpp (torch headers) takes most of the time, the kernel files about a second each
            with ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
                futures = [pool.submit(_run, [*compiler, *_flags(name), "-c", str(SOURCE_DIR / name), "-o",
                                              str(obj)], logs[name]) for name, obj in objects.items()]
                for future in futures:
                    future.result()
            partial = Path(work) / LIBRARY_NAME
            _run([*compiler, *map(str, objects.values()), *_link_flags(), "-o", str(partial)], logs["link"])
            os.replace(partial, target)
        finally:
            (target.parent / "build.log").write_text("\n".join(line for entry in logs.values() for line in entry))
    return time.perf_counter() - start


def library_path() -> Path:
    """The cached library for this source, torch and compiler, built (once, under a file lock) if missing;
    ``$GLMTUNE_KERNEL_LIBRARY`` instead when set (a prebuilt library, no compiler needed)."""
    prebuilt = os.environ.get(LIBRARY_ENV, "").strip()
    if prebuilt:
        path = Path(prebuilt).expanduser()
        if not path.is_file():
            raise BuildError(f"{LIBRARY_ENV}={prebuilt!r} is not a file")
        return path
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise BuildError(f"the kernels are x86-64 only (this machine is {platform.machine() or 'unknown'})")
    if os.name != "posix":
        raise BuildError("building the kernels needs a Linux or macOS C++ toolchain")
    compiler = _compiler()
    folder = cache_root() / _build_key(compiler, _compiler_version(compiler))
    target = folder / LIBRARY_NAME
    if target.exists():
        return target
    import fcntl  # POSIX only: imported after the platform check

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                logger.info("compiling glmtune CPU kernels (once per machine, about 10-20 s) into %s", folder)
                seconds = _compile(compiler, target)
                logger.info("compiled glmtune CPU kernels in %.1f s into %s", seconds, folder)
    except OSError as exc:
        raise BuildError(f"cannot write the kernel cache {folder} ({exc}); set {CACHE_ENV}") from exc
    except BuildError as exc:
        raise BuildError(f"{exc} (full log: {folder / 'build.log'})") from exc
    return target


@functools.cache
def load() -> str | None:
    """Build if needed and load the library into ``torch.ops.glmtune`` once per process; None when loaded,
    otherwise the reason it is not available (the caller falls back to torch's kernels)."""
    try:
        torch.ops.load_library(str(library_path()))
    except BuildError as exc:
        return str(exc)
    except (OSError, RuntimeError) as exc:
        return f"loading the kernel library failed ({str(exc).splitlines()[0]})"
    return None
