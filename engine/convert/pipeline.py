"""Readers → compute → writers, with a bounded number of bytes in flight, over a list of output shards.

Items are taken shard by shard, inside a shard in the order their source bytes lie on disk (sequential
reads; the output does not depend on the order). A pool of reader threads reads the next items' source
tensors (positioned reads, GIL released; page-locked buffers for CUDA) while the calling thread does the
math on the current one (the C and numba kernels and CUDA release the GIL too; on CUDA three threads, each on its own
stream, so that one item's host syncs overlap the others' kernels), and a pool of writer threads writes each
output tensor at its offset in every output layout's shard, hashing it from memory as it goes
(engine.checkpoint.digest). A shard is closed (fsync, rename, manifest) on a closer thread as soon as its
last item is written. Items read but not yet written hold at most INFLIGHT_BYTES, so memory is a few
items, never a shard.

On CPU the data are host arrays (engine.checkpoint.host) and the math is engine.convert.compute_host's: the
process imports no torch for it. On CUDA they are torch tensors and the math is engine.convert.compute's.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.shard_plan import ShardPlan
from engine.checkpoint.writer import ShardFile
from engine.convert import compute_host
from engine.convert.device import usable_cores
from engine.convert.plan import TO_NVFP4, Item, ItemResult
from engine.core import timeline
from engine.core.settings import settings

QUEUE = 3
_DONE = object()
PREFETCH_BYTES = 256 << 20  # source bytes the kernel is asked to read ahead of the readers
INFLIGHT_BYTES = 768 << 20  # items read but not yet written, at most (one bigger item still goes alone)
INFLIGHT_BYTES_CUDA = 512 << 20  # a CUDA process holds ~1 GB of its own (libraries, context, pinned pool)


@dataclass(frozen=True)
class ShardTask:
    """One output shard index: its items and, per output layout, the shard to write (None: already done)."""

    index: int
    items: tuple[Item, ...]
    targets: tuple[tuple[type, str, ShardPlan], ...]  # (output Layout class, partial dir, plan) still to write


def device_type(device) -> str:
    """"cpu" or "cuda" of a device given as a string ("cuda:1") or a torch.device, without torch."""
    return str(device).split(":", 1)[0]


def io_threads(device) -> tuple[int, int, int]:
    """(readers, computers, writers). On CUDA the math is quick and the host has cores to spare: several
    reads and writes in flight keep a fast disk busy, three compute threads keep the GPU busy. On CPU one
    compute thread per core, each item's kernels on its own thread (engine.convert.compute_host: no barrier
    per call for a busy reader or writer thread to hold up); on a few cores two readers and writers overlap
    I/O waits without taking them; from 8 cores the kernels outrun the disk and the I/O threads are what keep
    them busy (H100 box, 16 cores, data evicted: 2 writers 8.5 s, 4 writers 7.6 s).
    QUANTDECK_READERS / QUANTDECK_COMPUTERS / QUANTDECK_WRITERS override."""
    cores = usable_cores()
    io = min(8, max(2, cores // 2))
    if device_type(device) == "cuda":
        r, c, w = io, 3, io
    else:
        r, c, w = (io, cores, io) if cores >= 8 else (2, cores, 2)
    s = settings()
    return max(1, s.readers or r), max(1, s.computers or c), max(1, s.writers or w)


def source_names(item: Item) -> list[str]:
    return [n for m in item.members for n in m.sources]


def read_order(reader: CheckpointReader, items: tuple[Item, ...]) -> list[Item]:
    """`items` by where their first source tensor lies (shard, offset): reads sweep the files forward."""
    def where(it: Item):
        m = reader.meta(it.members[0].name)
        return m.shard, m.start

    return sorted(items, key=where)


class _Stop(Exception):
    pass


def _put(q: queue.Queue, obj, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(obj, timeout=0.2)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        if stop.is_set():
            raise _Stop
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


class _Budget:
    """Bytes of items in flight (read, not yet written); waits for room, one oversized item alone."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self.stop = limit, 0, stop
        self.cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cv:
            while self.used and self.used + n > self.limit:
                if self.stop.is_set():
                    raise _Stop
                self.cv.wait(0.2)
            self.used += n

    def release(self, n: int) -> None:
        with self.cv:
            self.used -= n
            self.cv.notify_all()


def _item_bytes(item: Item, on_gpu: bool) -> int:
    """What an item holds in host memory in flight: its inputs or outputs, whichever is more, and on CPU its
    math's workspace."""
    return max(item.src_bytes, sum(s.nbytes for s in item.outputs)) + (0 if on_gpu else
                                                                          compute_host.workspace_bytes(item))


def run_tasks(reader: CheckpointReader, tasks: list[ShardTask], *, device="cpu",
              v4_fp8: bool = False, metadata: dict[str, str] | None = None,
              on_item: Callable[[Item, list[str]], None] | None = None,
              finish: Callable[[Item, ItemResult], ItemResult] | None = None) -> dict[str, float]:
    """Convert and write every task's shards; `finish` (on a compute thread) may add or recast an item's outputs
    before they are written (export's activation scales). Returns busy seconds per phase (summed over the threads
    of each pool), plus where the compute threads waited (`wait_read_s`: for reads, `wait_write_s`: for the writers),
    how long the readers waited for room in the in-flight budget (`wait_budget_s`), the time to the first
    item's math (`first_s`) and the pipeline's wall time (`wall_s`). Raises the first error of any thread;
    shards not finished are removed, finished ones stay for a resume."""
    metadata = {"format": "pt"} if metadata is None else metadata
    delay = settings().faults.item_delay_s  # test hook: so an integration test can kill -9 a real run mid-way
    n_read, n_compute, n_write = io_threads(device)
    on_gpu = device_type(device) == "cuda"  # torch tensors, page-locked reads
    stop = threading.Event()
    errors: list[BaseException] = []
    busy = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "close_s": 0.0,
            "wait_read_s": 0.0, "wait_write_s": 0.0, "wait_budget_s": 0.0}
    t_start = time.monotonic()
    first: list[float] = []
    lock = threading.Lock()  # busy, shard states, on_item
    budget = _Budget(INFLIGHT_BYTES_CUDA if on_gpu else INFLIGHT_BYTES, stop)
    q_in: queue.Queue = queue.Queue(QUEUE + n_read)
    q_out: queue.Queue = queue.Queue(QUEUE)
    readers = ThreadPoolExecutor(n_read, thread_name_prefix="convert-read")
    writers = ThreadPoolExecutor(n_write, thread_name_prefix="convert-write")
    closer = ThreadPoolExecutor(2, thread_name_prefix="convert-close")
    pending: list[Future] = []  # write and close jobs not known to be done (under `lock`)
    open_files: dict[int, list[ShardFile]] = {}  # task index -> its shard files, until closed
    left: dict[int, int] = {}  # task index -> items not yet written

    def fail(e: BaseException) -> None:
        if not isinstance(e, _Stop):
            with lock:
                errors.append(e)
        stop.set()

    def add_busy(key: str, t0: float) -> None:
        with lock:
            busy[key] += time.monotonic() - t0

    flat = [(task, item) for task in tasks for item in read_order(reader, task.items)]

    def read_item(item: Item) -> dict:
        t0 = time.monotonic()
        if stop.is_set():
            raise _Stop
        if on_gpu:
            src = {n: reader.get(n, pin=True) for n in source_names(item)}
        else:
            src = {n: reader.get_host(n) for n in source_names(item)}
        add_busy("read_s", t0)
        timeline.mark("first_read")
        return src

    def read_loop() -> None:
        ahead = 0  # items [0, ahead) have been handed to the kernel's readahead
        window = 0  # source bytes prefetched beyond the item being read
        try:
            for k, (task, item) in enumerate(flat):
                if ahead > k:
                    window -= item.src_bytes
                while ahead < len(flat) and (ahead <= k or window < PREFETCH_BYTES):
                    if ahead > k:
                        window += flat[ahead][1].src_bytes
                    for n in source_names(flat[ahead][1]):
                        reader.prefetch(n)
                    ahead += 1
                t0 = time.monotonic()
                budget.acquire(_item_bytes(item, on_gpu))
                add_busy("wait_budget_s", t0)
                _put(q_in, (task, item, readers.submit(read_item, item)), stop)
            _put(q_in, _DONE, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            fail(e)

    def close(task: ShardTask) -> None:
        t0 = time.monotonic()
        for f in open_files[task.index]:
            f.close()
        with lock:
            del open_files[task.index]
        add_busy("close_s", t0)

    def write_item(task: ShardTask, item: Item, result) -> None:
        try:
            if stop.is_set():
                return
            t0 = time.monotonic()
            nvfp4 = item.action == TO_NVFP4
            for (lay, _, _), sf in zip(task.targets, open_files[task.index], strict=True):
                for name, t in result.tensors.items():
                    sf.write(*lay.out_tensor(name, t, nvfp4))
            add_busy("write_s", t0)
            budget.release(_item_bytes(item, on_gpu))
            with lock:
                left[task.index] -= 1
                last = left[task.index] == 0
                if on_item is not None:
                    on_item(item, result.notes)
            if last:
                track(closer.submit(guard, close, task))
            if delay:
                time.sleep(delay)
        except BaseException as e:  # noqa: BLE001
            fail(e)

    def track(fut: Future) -> None:
        with lock:
            if len(pending) >= 256:  # forget finished jobs: a long run holds only those in flight
                pending[:] = [f for f in pending if not f.done()]
            pending.append(fut)

    def guard(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001
            fail(e)

    def write_loop() -> None:
        try:
            while True:
                msg = _get(q_out, stop)
                if msg is _DONE:
                    break
                task, item, result = msg
                if task.index not in left:
                    files = [ShardFile(d, plan, metadata) for _, d, plan in task.targets]
                    with lock:
                        open_files[task.index] = files
                        left[task.index] = len(task.items)
                track(writers.submit(write_item, task, item, result))
        except BaseException as e:  # noqa: BLE001
            fail(e)

    if on_gpu:
        import torch

        from engine.convert.compute import compute_item

    def compute(item: Item, src: dict):
        if not on_gpu:
            result = compute_host.compute_item(item, src, v4_fp8=v4_fp8, item_parallel=n_compute > 1)
        else:
            result = compute_item(item, src, device, v4_fp8=v4_fp8)
            result.tensors = {k: v.to("cpu", non_blocking=False) for k, v in result.tensors.items()}
        return finish(item, result) if finish is not None else result

    def compute_loop() -> None:
        stream = torch.cuda.Stream(device=device) if on_gpu and n_compute > 1 else None
        try:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                while True:
                    t0 = time.monotonic()
                    msg = _get(q_in, stop)
                    if msg is _DONE:
                        _put(q_in, _DONE, stop)  # for the other compute threads
                        return
                    task, item, fut = msg
                    src = fut.result()
                    add_busy("wait_read_s", t0)
                    t0 = time.monotonic()
                    if not first:
                        first.append(t0 - t_start)
                    result = compute(item, src)
                    add_busy("compute_s", t0)
                    timeline.mark("first_computed")
                    del src, fut
                    t0 = time.monotonic()
                    _put(q_out, (task, item, result), stop)
                    add_busy("wait_write_s", t0)
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001
            fail(e)

    rt = threading.Thread(target=read_loop, name="convert-reader", daemon=True)
    wt = threading.Thread(target=write_loop, name="convert-writer", daemon=True)
    rt.start()
    wt.start()
    computers = [threading.Thread(target=compute_loop, name=f"convert-compute-{k}", daemon=True)
                 for k in range(1, n_compute)]
    for t in computers:
        t.start()
    compute_loop()  # this thread is one of them
    for t in computers:
        t.join()
    try:
        _put(q_out, _DONE, stop)
    except _Stop:
        pass
    wt.join()
    while True:  # write jobs may add close jobs: wait until none is left
        with lock:
            jobs = [f for f in pending if not f.done()]
        if not jobs:
            break
        for f in jobs:
            f.exception()
    stop.set()
    rt.join()
    for ex in (readers, writers, closer):
        ex.shutdown(wait=True, cancel_futures=True)
    if errors:
        for files in list(open_files.values()):
            for f in files:
                if f.fd >= 0:
                    f.abort()
        raise errors[0]
    busy["first_s"] = first[0] if first else 0.0
    busy["wall_s"] = time.monotonic() - t_start
    return {k: round(v, 3) for k, v in busy.items()}
