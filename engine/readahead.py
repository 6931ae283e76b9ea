"""Start reading a checkpoint into the page cache before anything heavy is imported (no torch here).

A GPU conversion is bound by the disk, and its process spends its first seconds importing torch and
creating the CUDA context while the disk sits idle. `start(src, device)` reads the source's index, and on
a background thread (normal I/O priority; QUANTDECK_READAHEAD_IDLE=1: idle) asks the kernel to read ahead
(`posix_fadvise(WILLNEED)`) the first shards up to a budget — what the pipeline reads first — so that
those seconds are spent reading. A hint only: nothing is read into our memory (page cache is not RSS),
errors are ignored, and the converter reads correctly without it. Not on CPU: there the conversion is
bound by the cores, and reading early only slows the interpreter's own (cold) import (measured on 2 cores:
torch's cold import ~1 s slower beside it). QUANTDECK_NO_READAHEAD=1 turns it off.
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


def gpu_likely(device: str | None) -> bool:
    """Will this run be on CUDA? Decided without torch: the device asked for, or for auto, an NVIDIA driver."""
    d = str(device or "auto").lower()
    if d.startswith("cuda"):
        return True
    if d != "auto":
        return False
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return os.path.exists("/dev/nvidia0")


def _idle_io() -> None:
    try:  # ioprio_set(IOPRIO_WHO_PROCESS, this thread, IOPRIO_CLASS_IDLE): the import's own reads first
        import ctypes

        nr = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine)
        if nr is not None:
            ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0, 3 << 13)
    except (OSError, AttributeError):
        pass


def _willneed(paths: list[str], budget: int) -> None:
    if os.environ.get("QUANTDECK_READAHEAD_IDLE") == "1":
        _idle_io()
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


def start(src: str | os.PathLike, device: str | None = "auto", budget: int | None = None) -> threading.Thread | None:
    """For a GPU run, begin reading ahead `src`'s first shards (up to `budget` bytes; default: min(8 GiB, a
    quarter of the available memory)) on a daemon thread; once per directory per process. Returns the
    thread, or None (CPU run, turned off, nothing to read)."""
    if not gpu_likely(device):
        return None
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
