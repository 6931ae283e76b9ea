"""Build quantdeck's C kernels (kernels.c) once per machine and load them with ctypes.

Why C beside numba: a converter that imports numba spends its first seconds there. Measured on an H200
machine (16 cores, page cache dropped): `import numba` 1.97 s, its cached kernels loaded at 2.46 s, and in a
7.2 GB conversion no tensor was computed before 3-4 s while the disk sat idle behind a full in-flight budget.
A shared library of the same row bodies loads in milliseconds. It is compiled at first use with the
machine's C compiler (`$CC`, else cc, gcc or clang; the compiler Triton needs too) into the user's cache
directory, keyed by the source, the compiler and the CPU (it is built with -march=native), and reused after.
Where none can be built (no compiler, a failed build) the numba kernels are used, with the reason kept in
`unavailable()`; QUANTDECK_KERNELS=numba asks for them, QUANTDECK_KERNELS=c refuses to fall back.

Flags: -O3 -march=native -ffp-contract=off (no fused multiply-add: every product is rounded to float32
first, as in the reference) and no -ffast-math, so the float32 operations are IEEE's, in the source's order.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from engine.core.fsutil import user_cache_dir
from engine.core.settings import settings
from engine.formats.native import calls

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")
ABI = 3  # qd_abi_version() of kernels.c
ENV = "QUANTDECK_KERNELS"  # "c", "numba" or unset (c where it builds); read in engine.core.settings

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library, "why": why there is none


class BuildError(RuntimeError):
    pass


def compiler() -> list[str] | None:
    """The C compiler's command: $CC (which may carry arguments, e.g. "ccache gcc"), else the first of cc, gcc,
    clang on PATH."""
    env = shlex.split(os.environ.get("CC") or "")
    if env and shutil.which(env[0]):
        return [shutil.which(env[0]), *env[1:]]  # type: ignore[list-item]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def cache_dir() -> Path:
    """`<user cache dir>/quantdeck/native` (QUANTDECK_NATIVE_CACHE overrides; without platformdirs,
    $XDG_CACHE_HOME or ~/.cache)."""
    env = settings().native_cache
    return Path(env) if env else user_cache_dir("native")


def _cpu() -> str:
    """What -march=native depends on: the machine and its CPU's model and feature flags."""
    seen: list[str] = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part") and line not in seen:
                    seen.append(line)
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "".join(seen)


def library_path(cc: list[str]) -> Path:
    """Where the library built by `cc` for this source and CPU lives."""
    real = " ".join([os.path.realpath(cc[0]), *cc[1:]])
    try:
        st = os.stat(cc[0])
        stamp = f"{real}:{st.st_size}:{int(st.st_mtime)}"  # (of the command's first word)
    except OSError:
        stamp = real
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), stamp.encode(), _cpu().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"kernels-{h.hexdigest()[:20]}.so"


def build(cc: list[str], dst: Path) -> None:
    """Compile kernels.c into `dst` (atomically: a temp file renamed over it). BuildError with the compiler's
    output on failure."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=dst.parent)
    os.close(fd)
    name = os.path.basename(cc[-1] if len(cc) > 1 else cc[0])
    try:
        r = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise BuildError(f"{name} failed on {SOURCE.name}: {(r.stderr or r.stdout).strip()[-800:]}")
        os.replace(tmp, dst)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"could not run {' '.join(cc)}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    """Load `path` and check it is kernels.c's ABI; BuildError otherwise."""
    try:
        lib = ctypes.CDLL(str(path))
        abi = lib.qd_abi_version()
    except (OSError, AttributeError) as e:
        raise BuildError(f"{path} does not load as quantdeck's kernels: {e}") from e
    if abi != ABI:
        raise BuildError(f"{path} has ABI {abi}, expected {ABI}")
    return calls.typed(lib)


def _open_fresh(path: Path) -> ctypes.CDLL:
    """Load a just rebuilt `path` under a name of its own: the dynamic loader hands back the library it already
    mapped for a path it has seen (a bad library's), whatever the file now holds."""
    link = path.with_name(f".load-{os.getpid()}-{threading.get_ident()}-{path.name}")
    os.link(path, link)
    try:
        return _open(link)
    finally:
        os.unlink(link)  # the mapping stays


def _load() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc, gcc or clang; or set CC)")
    path = library_path(cc)
    if not path.exists():
        build(cc, path)
        return _open(path)
    try:
        return _open(path)
    except BuildError:  # a torn or foreign file: build it again
        build(cc, path)
        return _open_fresh(path)


def _wanted() -> str:
    """QUANTDECK_KERNELS: "c", "numba" or "" (c where it builds)."""
    return settings().kernels


def library() -> ctypes.CDLL | None:
    """The loaded C kernels, built on first use; None where the numba kernels are to be used (see
    `unavailable()`). Thread-safe; the result is kept for the process (once loaded, no lock: every kernel call
    asks)."""
    want = _wanted()
    if want == "numba":
        return None
    lib = _state.get("lib")
    if lib is not None:
        return lib  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state and "why" not in _state:
            try:
                _state["lib"] = _load()
            except Exception as e:  # noqa: BLE001 - any failure to build or load: numba's kernels do the work
                _state["why"] = str(e) if isinstance(e, (BuildError, OSError)) else f"{type(e).__name__}: {e}"
        if "why" in _state and want == "c":
            raise BuildError(f"{ENV}=c, but the C kernels cannot be built: {_state['why']}")
        return _state.get("lib")  # type: ignore[return-value]


def used() -> str | None:
    """What this process's CPU kernels have been: "c", "numba", or None while none has been asked for. Builds
    nothing (a conversion's summary, after the fact)."""
    if _wanted() == "numba":
        return "numba" if "numba" in sys.modules else None
    if "lib" in _state:
        return "c"
    return "numba" if "why" in _state else None


def unavailable() -> str | None:
    """Why `library()` returned None (None while it has not been asked, or when it has the library)."""
    return _state.get("why")  # type: ignore[return-value]


def forget() -> None:
    """Drop the kept result (tests)."""
    with _lock:
        _state.clear()
