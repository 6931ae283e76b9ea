"""The files a converter's start reads (its modules' bytecode, extension modules and shared libraries), kept in a
list after a run, so that the next start on a cold machine can read them back in one parallel burst and then read
the source ahead at once (engine.startup.readahead).

Why: with the page cache dropped, a CPU conversion's imports (numpy, the engine; ~0.5 s) read hundreds of small
files from the disk, and reading the source beside them slows them down (H200 box: imports done at 2.7 s instead
of 0.5 s beside a 4-thread read-ahead), so the read-ahead waited for warm libraries and the disk idled through the
imports. Read in one burst first (373 files, 70 MB: 0.12 s there), the imports no longer wait on the disk and the
source's read-ahead runs beside them.

`record(kind)` writes the list of what this process has loaded (an entry point calls it after a successful
conversion; kind names the entry, e.g. "engine.convert"); `listed(kind)` returns it for the same interpreter, or
[] (never recorded, unreadable). A list from another module path only costs some needless reads; the next run
writes its own. Lists live under `<user cache>/quantdeck/start-files/` (or
QUANTDECK_START_FILES); a missing listed file is skipped by the reader. No numpy, torch or numba here.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from engine.core.fsutil import user_cache_dir
from engine.core.settings import settings

MAX_BYTES = 1 << 30  # a list never asks for more than this (a process that imported torch's CUDA libraries)


def _dir() -> Path:
    env = settings().start_files
    return Path(env) if env else user_cache_dir("start-files")


def list_path(kind: str) -> Path:
    """The list for `kind` and this interpreter (a venv's python is its own) and version."""
    tag = hashlib.sha256("\0".join([sys.executable, sys.version]).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in kind)
    return _dir() / f"{safe}-{tag}.txt"


def loaded_files() -> list[str]:
    """What this process has read to start: each module's bytecode (else its source or extension module), and the
    shared libraries it has mapped; the interpreter's own binary. Sorted, no duplicates, at most MAX_BYTES."""
    seen: set[str] = set()
    for mod in list(sys.modules.values()):
        try:
            found = (getattr(mod, "__cached__", None), getattr(mod, "__file__", None))  # an import reads the bytecode
        except Exception:  # noqa: BLE001 - a module's own __getattr__
            continue
        for f in found:
            if isinstance(f, str) and os.path.isfile(f):
                seen.add(os.path.realpath(f))
                break
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6:
                    p = parts[5].strip()
                    if p.startswith("/") and ".so" in os.path.basename(p) and os.path.isfile(p):
                        seen.add(p)
    except OSError:
        pass
    if sys.executable and os.path.isfile(sys.executable):
        seen.add(os.path.realpath(sys.executable))
    sizes = {}
    for p in seen:
        try:
            sizes[p] = os.path.getsize(p)
        except OSError:
            pass
    out, total = [], 0
    for p in sorted(sizes, key=lambda p: (sizes[p], p)):  # over MAX_BYTES the largest files are left out
        total += sizes[p]
        if total > MAX_BYTES:
            break
        out.append(p)
    return sorted(p for p in out if p.isprintable())  # one path per line: no newlines in a name


def listed(kind: str) -> list[str]:
    """The recorded list for `kind` (paths that may since have gone), or []. Not stat'ed here: on a cold machine
    that is disk reads too (the reader skips what is gone and stops at MAX_BYTES, whatever the file says)."""
    try:
        text = list_path(kind).read_text(errors="surrogateescape")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.startswith("/")]


def record(kind: str) -> bool:
    """Write this process's `loaded_files()` as `kind`'s list, unless the same list is there; True if written.
    Never raises: the list only makes a later cold start faster."""
    tmp = None
    try:
        files = loaded_files()
        if not files or files == listed(kind):
            return False
        path = list_path(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(files) + "\n", errors="surrogateescape")
        os.replace(tmp, path)
        return True
    except Exception:  # noqa: BLE001 - an odd module or path, a full disk: the conversion has succeeded
        if tmp is not None:
            try:
                tmp.unlink()
            except OSError:
                pass
        return False
