"""Start reading a checkpoint into the page cache before anything heavy is imported (no torch here).

A GPU conversion is bound by the disk, and its process spends its first seconds importing torch and
creating the CUDA context while the disk sits idle. `start(src, device)` reads the source's index, and on
background threads (normal I/O priority; QUANTDECK_READAHEAD_IDLE=1: idle) reads the first shards up to a
budget — what the pipeline reads first, in that order — through a small reused buffer, so those seconds are
spent reading and the pipeline then finds its bytes in the page cache. Page cache is not RSS: the process holds
only the buffers (4 threads × 4 MiB). Errors are ignored: the converter reads correctly without it.

It reads, rather than asking the kernel with `posix_fadvise(WILLNEED)`: measured on an H100 machine
(virtio disk, 1.5 GB/s), WILLNEED returned at once and left the cache cold (a read 3.3 s later took as long as a
cold one), and one reading thread reaches only 0.8 GB/s where four reach the disk's 1.5 GB/s.

Not while torch's own libraries are cold (`interpreter_cold`): the import then needs the disk itself. Not on
CPU with few cores: there the conversion is bound by the cores, and reading early only slows the
interpreter's own (cold) imports (measured on 2 cores: torch's cold import ~1 s slower beside it).
QUANTDECK_NO_READAHEAD=1 turns it off; QUANTDECK_READAHEAD_THREADS=N sets the readers (default 4).
"""

from __future__ import annotations

import json
import os
import sys
import threading

from engine.core import meminfo
from engine.core.libc import libc
from engine.core.settings import settings
from engine.startup import startfiles

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
STEP = 4 << 20  # one read
THREADS = 4  # parallel reads: one thread reaches about half the disk's speed
IMPORT_LIBS = ("libtorch_cpu.so", "libtorch_cuda.so", "libtorch_python.so")  # loaded by every `import torch`
CAP = 8 << 30  # never ask for more than this up front (the pipeline's own readahead takes over)
_started: set[str] = set()
_lock = threading.Lock()


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
    avail = meminfo.available()
    return min(CAP, avail // 4) if avail else 1 << 30


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver with at least one GPU (asked of the driver's files, not of torch)."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return os.path.exists("/dev/nvidia0")


def gpu_likely(device: str | None) -> bool:
    """Will this run be on CUDA? Decided without torch: the device asked for, or for auto, an NVIDIA driver."""
    d = str(device or "auto").lower()
    if d.startswith("cuda"):
        return True
    if d != "auto":
        return False
    return nvidia_gpu_present()


def _idle_io() -> None:
    try:  # ioprio_set(IOPRIO_WHO_PROCESS, this thread, IOPRIO_CLASS_IDLE): the import's own reads first
        nr = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine) if sys.platform == "linux" else None
        if nr is not None:
            libc().syscall(nr, 1, 0, 3 << 13)
    except (OSError, AttributeError):
        pass


class ReadAhead(threading.Thread):
    """Reads `paths` (in order, up to `budget` bytes) into the page cache with `threads` readers; `bytes_read`."""

    def __init__(self, paths: list[str], budget: int, threads: int = THREADS, first: list[str] | None = None):
        super().__init__(name="readahead", daemon=True)
        self.paths, self.budget, self.threads = paths, budget, threads
        self.first = list(first or [])  # read whole before `paths`, outside the budget (engine.startup.startfiles)
        self.bytes_read = 0
        self._lock = threading.Lock()

    def _chunks(self):
        first_left = startfiles.MAX_BYTES
        for p in self.first:  # one job per file, opened and closed by its reader (never a descriptor per file held)
            try:
                size = os.path.getsize(p)
            except OSError:
                continue
            if size > first_left:
                break
            if not size:
                continue
            first_left -= size
            yield p, 0, None  # no length: the whole file
        left = self.budget
        for p in self.paths:
            try:
                size = os.path.getsize(p)
            except OSError:
                continue
            off = 0
            while off < size and left > 0:
                n = min(STEP, size - off, left)
                yield p, off, n
                off += n
                left -= n
            if left <= 0:
                return

    def _reader(self, chunks) -> None:
        if settings().readahead_idle:
            _idle_io()
        buf = memoryview(bytearray(STEP))
        fds: dict[str, int] = {}
        try:
            while True:
                with self._lock:
                    job = next(chunks, None)
                if job is None:
                    return
                p, off, n = job
                if n is None:
                    got = _read_whole(p, buf)
                    with self._lock:
                        self.bytes_read += got
                    continue
                try:
                    if p not in fds:
                        fds[p] = os.open(p, os.O_RDONLY)
                        os.posix_fadvise(fds[p], 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    got = os.preadv(fds[p], [buf[:n]], off)
                except OSError:
                    continue
                with self._lock:
                    self.bytes_read += got
        finally:
            for fd in fds.values():
                os.close(fd)

    def run(self) -> None:
        chunks = self._chunks()
        readers = [threading.Thread(target=self._reader, args=(chunks,), name=f"readahead-{i}", daemon=True)
                   for i in range(max(1, self.threads))]
        for t in readers:
            t.start()
        for t in readers:
            t.join()


def _read_whole(path: str, buf: memoryview) -> int:
    """Read `path` through `buf` (into the page cache), then close it; bytes read (0 on any error)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0
    got = 0
    try:
        while True:
            n = os.preadv(fd, [buf], got)
            if n <= 0:
                return got
            got += n
    except OSError:
        return got
    finally:
        os.close(fd)


def _page_cached(path: str, offset: int = 0) -> bool | None:
    """Is the page of `path` at `offset` in the page cache? (A read with RWF_NOWAIT fails with EAGAIN instead of
    going to the disk.) None where that cannot be asked."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        os.preadv(fd, [bytearray(4096)], offset & ~4095, flag)
        return True
    except BlockingIOError:
        return False
    except OSError:  # RWF_NOWAIT not supported here
        return None
    finally:
        os.close(fd)


def _some_cold(files: list[str]) -> bool:
    """Is the first page of any of `files` out of the page cache (where the kernel can tell)?"""
    seen = [c for c in (_page_cached(p) for p in files) if c is not None]
    return bool(seen) and not all(seen)


# the torch-free CPU path's main native library: (package, folder, file name prefix). Its kernels are C
# (engine.formats.native: a small library); numba's LLVM is loaded only where they cannot be built.
CPU_IMPORTS = (("numpy", "_core", "_multiarray_umath"),)


def _native_lib(package: str, sub: str, prefix: str) -> str | None:
    """The shared library `package/sub/prefix*.so*` (found, not imported), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    d = os.path.join(os.path.dirname(spec.origin), sub)
    try:
        libs = sorted(n for n in os.listdir(d) if n.startswith(prefix) and ".so" in n)
    except OSError:
        return None
    return os.path.join(d, libs[0]) if libs else None


def cpu_imports_cold() -> bool:
    """Is the CPU path's own library (numpy's core) out of the page cache? As for torch, the
    imports then need the disk themselves (measured on the H100 box, cache dropped: imports done at 2.6 s
    beside the read-ahead)."""
    return _some_cold([p for p in (_native_lib(*lib) for lib in CPU_IMPORTS) if p])


def interpreter_cold() -> bool:
    """Are torch's own files out of the page cache (a first run after boot, or a dropped cache)? Then its import
    reads GBs from the disk, and reading the source beside it only slows the import down: measured on an H100 box
    with the cache dropped, torch's import took 11 s instead of 5.7 beside a 4-thread read-ahead, and the whole
    conversion 16.9-20.2 s instead of 14.8. Probes the first page of torch's main libraries and of its
    package's bytecode (what every import reads), without importing torch (its package is found, not run)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    pkg = os.path.dirname(spec.origin)
    try:
        module = importlib.util.cache_from_source(spec.origin)  # the bytecode an import reads, where compiled
    except (NotImplementedError, ValueError):
        module = spec.origin
    files = [module if os.path.exists(module) else spec.origin]
    files += [os.path.join(pkg, "lib", n) for n in IMPORT_LIBS if os.path.exists(os.path.join(pkg, "lib", n))]
    return _some_cold(files)


def start(src: str | os.PathLike, device: str | None = "auto", budget: int | None = None,
          cpu_ok: bool = False, entry: str | None = None) -> threading.Thread | None:
    """For a GPU run (or a CPU run with `cpu_ok`: a many-core machine, where the torch-free CPU path is bound
    by the disk too), begin reading ahead `src`'s first shards (up to `budget` bytes; default: min(8 GiB, a
    quarter of the available memory)) on daemon threads; once per directory per process. Returns the
    ReadAhead thread, or None (CPU run, turned off, nothing to read). Skipped on a cold machine, it is not
    started later either: begun once the CPU kernels had loaded, it measured no faster (H200 box, 7.2 GB, cache
    dropped: 8.55 / 7.25 / 7.57 s against 6.65 / 7.67 / 8.00 s without).

    A CPU run whose `entry` point recorded the files its start reads (engine.startup.startfiles) reads those first, in
    one burst, then the source, cold machine or not: the imports then find their files in the page cache."""
    gpu = gpu_likely(device)
    if not gpu and not (cpu_ok and str(device) == "cpu"):
        return None
    key = os.path.realpath(os.fspath(src))
    with _lock:
        if key in _started:
            return None
        _started.add(key)
    s = settings()
    if s.no_readahead:
        return None
    first = startfiles.listed(entry) if entry and not gpu else []
    forced = s.readahead == "always"  # even beside cold imports (measurements)
    if not first and not forced and (interpreter_cold() if gpu else cpu_imports_cold()):
        return None
    paths = source_shards(src)
    if not paths:
        return None
    threads = s.readahead_threads or THREADS
    t = ReadAhead(paths, default_budget() if budget is None else int(budget), threads=threads, first=first)
    t.start()
    return t
