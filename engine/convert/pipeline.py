"""Reader thread → compute → writer thread, with bounded queues, over a list of output shards.

The reader thread reads each item's source tensors (positioned reads, GIL released), the calling thread
does the math (torch / numba release the GIL too), and the writer thread writes each output tensor at its
offset in every output layout's shard and closes a shard (fsync, sha256, rename, manifest) as soon as its
last item is written. At most QUEUE items wait on either side, so memory is a few items, never a shard.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.writer import ShardFile, ShardPlan
from engine.convert.compute import compute_item
from engine.convert.plan import TO_NVFP4, Item, layout_tensor

QUEUE = 3
_DONE = object()
# Test hook: seconds to pause after each written item, so an integration test can kill -9 a real run mid-way.
DELAY_ENV = "QUANTDECK_TEST_ITEM_DELAY_S"
PREFETCH_BYTES = 256 << 20  # source bytes the kernel is asked to read ahead of the reader thread
INFLIGHT_BYTES = 768 << 20  # items read but not yet written, at most (one bigger item still goes alone)


@dataclass(frozen=True)
class ShardTask:
    """One output shard index: its items and, per output layout, the shard to write (None: already done)."""

    index: int
    items: tuple[Item, ...]
    targets: tuple[tuple[str, str, ShardPlan], ...]  # (layout, partial dir, plan) still to write


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


def run_tasks(reader: CheckpointReader, tasks: list[ShardTask], *, device: torch.device | str = "cpu",
              v4_fp8: bool = False, metadata: dict[str, str] | None = None,
              on_item: Callable[[Item, list[str]], None] | None = None) -> dict[str, float]:
    """Convert and write every task's shards; returns busy seconds per phase. Raises the first error of any
    thread. A finished shard is closed (hash catch-up, fsync, rename, manifest) on a closer thread while the
    writer goes on with the next one."""
    q_in: queue.Queue = queue.Queue(QUEUE)
    q_out: queue.Queue = queue.Queue(QUEUE)
    stop = threading.Event()
    errors: list[BaseException] = []
    metadata = {"format": "pt"} if metadata is None else metadata
    delay = float(os.environ.get(DELAY_ENV) or 0)
    busy = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "close_s": 0.0}
    closer = ThreadPoolExecutor(1, thread_name_prefix="convert-closer")
    closing: list[Future] = []

    def close(f: ShardFile) -> None:
        t = time.monotonic()
        f.close()
        busy["close_s"] += time.monotonic() - t

    def fail(e: BaseException) -> None:
        if not isinstance(e, _Stop):
            errors.append(e)
        stop.set()

    pin = torch.device(device).type == "cuda"
    flat = [(task, item) for task in tasks for item in task.items]

    def names_of(item: Item) -> list[str]:
        return [n for m in item.members for n in ((m.name, m.scale) if m.scale else (m.name,))]

    inflight = [0]
    room = threading.Condition()

    def item_bytes(item: Item) -> int:
        return max(item.src_bytes, sum(s.nbytes for s in item.outputs))

    def acquire(n: int) -> None:
        with room:
            while inflight[0] and inflight[0] + n > INFLIGHT_BYTES:
                if stop.is_set():
                    raise _Stop
                room.wait(0.2)
            inflight[0] += n

    def release(n: int) -> None:
        with room:
            inflight[0] -= n
            room.notify_all()

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
                    for n in names_of(flat[ahead][1]):
                        reader.prefetch(n)
                    ahead += 1
                acquire(item_bytes(item))
                src = {}
                t0 = time.monotonic()
                for n in names_of(item):
                    src[n] = reader.get(n, pin=pin)
                busy["read_s"] += time.monotonic() - t0
                _put(q_in, (task, item, src), stop)
            _put(q_in, _DONE, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            fail(e)

    def write_loop() -> None:
        open_files: list[ShardFile] = []
        current = None
        try:
            while True:
                msg = _get(q_out, stop)
                if msg is _DONE:
                    break
                task, item, result = msg
                t0 = time.monotonic()
                if current is not task:
                    open_files = [ShardFile(d, plan, metadata) for _, d, plan in task.targets]
                    current = task
                quantized = item.action == TO_NVFP4
                for (lay, _, _), sf in zip(task.targets, open_files):
                    for name, t in result.tensors.items():
                        out_name, out_t = layout_tensor(name, t, quantized, lay)
                        sf.write(out_name, out_t)
                if item is task.items[-1]:
                    closing.extend(closer.submit(close, f) for f in open_files)
                    open_files, current = [], None
                busy["write_s"] += time.monotonic() - t0
                release(item_bytes(item))
                if on_item is not None:
                    on_item(item, result.notes)
                if delay:
                    time.sleep(delay)
        except BaseException as e:  # noqa: BLE001
            for f in open_files:
                f.abort()
            fail(e)

    rt = threading.Thread(target=read_loop, name="convert-reader", daemon=True)
    wt = threading.Thread(target=write_loop, name="convert-writer", daemon=True)
    rt.start()
    wt.start()
    try:
        while True:
            msg = _get(q_in, stop)
            if msg is _DONE:
                _put(q_out, _DONE, stop)
                break
            task, item, src = msg
            t0 = time.monotonic()
            result = compute_item(item, src, device, v4_fp8=v4_fp8)
            if torch.device(device).type != "cpu":
                result.tensors = {k: v.to("cpu", non_blocking=False) for k, v in result.tensors.items()}
            busy["compute_s"] += time.monotonic() - t0
            del src
            _put(q_out, (task, item, result), stop)
    except _Stop:
        pass
    except BaseException as e:  # noqa: BLE001
        fail(e)
    wt.join()
    stop.set()
    rt.join()
    for fut in closing:
        try:
            fut.result()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    closer.shutdown()
    if errors:
        raise errors[0]
    return {k: round(v, 3) for k, v in busy.items()}
