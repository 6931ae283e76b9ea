"""Start reading a checkpoint into the page cache before anything heavy is imported (no torch here).

A converter process spends its first seconds importing torch (and on a GPU, creating the CUDA context)
while the disk sits idle. `start(src)` reads the source's index, and on a background thread asks the
kernel to read ahead (`posix_fadvise(WILLNEED)`) the first shards up to a budget — what the pipeline
reads first — so that those seconds are spent reading. A hint only: nothing is read into our memory
(page cache is not RSS), errors are ignored, and the converter reads correctly without it.
"""

from __future__ import annotations

import json
import os
import threading

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STEP = 32 << 20  # one readahead request
CAP = 8 << 30  # never ask for more than this up front (the pipeline's own readahead takes over)
_started: set[str] = set()
_lock = threading.Lock()


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def source_shards(src: str | os.PathLike) -> list[str]:
    """The shard files of a checkpoint directory, in the order the converter reads them (sorted)."""
    d = os.fspath(src)
    try:
        with open(os.path.join(d, INDEX)) as fh:
            wm = json.load(fh).get("weight_map") or {}
        names = sorted({str(v) for v in wm.values()})
    except (OSError, ValueError, AttributeError):
        names = [SINGLE] if os.path.exists(os.path.join(d, SINGLE)) else []
    return [os.path.join(d, n) for n in names]


def default_budget() -> int:
    avail = _mem_available()
    return min(CAP, avail // 4) if avail else 1 << 30


def _willneed(paths: list[str], budget: int) -> None:
    left = budget
    for p in paths:
        if left <= 0:
            return
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            off = 0
            while off < size and left > 0:
                n = min(STEP, size - off, left)
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
                off += n
                left -= n
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)


def start(src: str | os.PathLike, budget: int | None = None) -> threading.Thread | None:
    """Begin reading ahead `src`'s first shards (up to `budget` bytes; default: min(8 GiB, a quarter of the
    available memory)) on a daemon thread; once per directory per process. Returns the thread, or None."""
    key = os.path.realpath(os.fspath(src))
    with _lock:
        if key in _started:
            return None
        _started.add(key)
    if os.environ.get("QUANTDECK_NO_READAHEAD"):
        return None
    paths = source_shards(src)
    if not paths:
        return None
    t = threading.Thread(target=_willneed, args=(paths, default_budget() if budget is None else int(budget)),
                         name="readahead", daemon=True)
    t.start()
    return t
