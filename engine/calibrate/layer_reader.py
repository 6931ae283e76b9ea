"""Calibration's layer reader: a layer's stored bytes read once, as stored, then assembled on the device.

`LayerReader.read(i)` (on the prefetch thread, while layer i-1 computes) plans layer i (engine.calibrate.
layer_plan) and fills one flat host buffer with its stored bytes: large positioned reads of the plan's
coalesced ranges, split over a few threads (os.preadv releases the GIL). On a GPU the buffer lives on the
device: the reads land in a small ring of page-locked chunks (RING_SLOTS × READ_CHUNK, allocated once) and each
chunk is uploaded on a copy stream of its own as soon as it is read, so the host holds a few hundred MB whatever
the layer's size and page-locking costs nothing per layer (page-locking a whole 11-23 GB layer took 5-10 s on an
H100 box). On the host, plain pieces already in the parameter's dtype are not buffered at all but read straight
into the parameters at assembly, and without shared reads there is no layer buffer either: the prefetch thread reads
the layer's ranges into the page cache only (`warm_ranges`, through a few MB a thread), and the assembly reads them
from there window by window (`assemble_in_windows`, WINDOW_BYTES of stored bytes at a time) straight into the
parameters. A host build so holds one layer's parameters and a window, where the whole buffer of the next layer's
encoded bytes lay beside them before (mid-cpu FP8, 6 layers, 2 cores: peak RSS 2.45 against 3.0 GB, wall 26.9
against 29.3 s).

Shared reads: under torch.distributed the ranks of a node each read 1/R of the buffer and all-gather it
(gloo: on the prefetch thread into the host buffer; NCCL: on the device at assembly), so each node reads
each byte once. The collectives use a process group of their own, so they never interleave with the
calibration's.

`LayerReader.assemble(raw)` (engine.calibrate.layer_assemble) builds the layer's state dict on the device.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from engine.calibrate.expert_store import stores_for, worth_streaming
from engine.calibrate.layer import keep_fp32
from engine.calibrate.layer_assemble import WINDOW_BYTES, assemble_in_windows, assemble_layer, dest_bytes
from engine.calibrate.layer_plan import LayerPlan, Piece, ReadRange, buffer_bound, plan_layer
from engine.checkpoint.reader import CheckpointReader, TensorMeta

READ_THREADS = 6
READ_CHUNK = 32 << 20  # one positioned read at most; larger ranges are split over the threads
WARM_CHUNK = 4 << 20  # a page-cache warming read's buffer (warm_ranges), one per reading thread
RING_SLOTS = 12  # page-locked chunks a GPU read streams through (RING_SLOTS × READ_CHUNK = 384 MiB)


@dataclass
class ReadShare:
    """The ranks that share a layer's reads: this rank's place in `group` (a torch.distributed group)."""

    group: object
    rank: int
    size: int
    backend: str  # "gloo" gathers into the host buffer, "nccl" on the device

    @classmethod
    def for_node(cls, ctx) -> "ReadShare | None":
        """A group of the ranks of this node (every rank calls this, in the same order); None for one rank."""
        if not ctx.active:
            return None
        import torch.distributed as dist

        local = ctx.local_world_size or ctx.world_size
        if local >= ctx.world_size:
            group = dist.new_group(backend=ctx.backend)
        else:
            group, _ = dist.new_subgroups(group_size=local, backend=ctx.backend)
        return cls(group, dist.get_rank(group), dist.get_world_size(group), ctx.backend)

    def part(self, nbytes: int) -> tuple[int, int]:
        """This rank's byte interval of a buffer of `nbytes` (padded to a multiple of `size`)."""
        per = -(-nbytes // self.size)
        return self.rank * per, (self.rank + 1) * per


@dataclass
class RawLayer:
    """A planned layer whose buffered bytes are in `buf` (or only this rank's share, where the gather is left)."""

    plan: LayerPlan
    buf: torch.Tensor | None  # None: read into the page cache only, built window by window (assemble_in_windows)
    gathered: bool
    times: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0
    ready: "torch.cuda.Event | None" = None  # a device buffer's uploads are done once this has passed
    stores: dict = field(default_factory=dict)  # streamed experts (engine.calibrate.expert_store), once assembled


class LayerReader:
    """Reads and assembles the decoder layers of `family` from `reader` (see the module docstring)."""

    def __init__(self, reader: CheckpointReader, family, hf_config, dtype: torch.dtype, device: torch.device,
                 layers: range, threads: int = READ_THREADS, direct: bool | None = None, budget: int | None = None):
        """`layers`: the layers to be read (the buffer is sized for the largest); `direct`: read plain pieces
        straight into host parameters (None: on a host build without shared reads); `budget`: device bytes a
        layer's build may hold beside the next layer's stored bytes; a layer that needs more streams its experts
        (engine.calibrate.expert_store; None: no limit)."""
        self.reader, self.family, self.hf_config = reader, family, hf_config
        self.dtype, self.device = dtype, device
        self.names = set(reader.names())
        self.keep_fp32 = keep_fp32(family, dtype)
        self.share: ReadShare | None = None
        self.direct = direct
        self.budget = budget
        self.bytes_read = 0
        self.source_bytes = 0  # stored bytes of the layers built
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="calib-read")
        self._layers = layers
        self._buf: torch.Tensor | None = None
        self._ring: DeviceRing | None = None  # a GPU read's page-locked chunks

    def share_reads(self, share: ReadShare | None) -> None:
        """Read 1/R of every layer and gather the rest from the ranks of `share` (call before the first read)."""
        self.share = share

    # -- reading (prefetch thread) ------------------------------------------------------------------------
    def plan(self, i: int) -> LayerPlan:
        host = self.device.type != "cuda"
        direct_ok = (host and self.share is None) if self.direct is None else (host and self.direct)
        plan = plan_layer(self.family, self.hf_config, i, self.reader, self.names, self.dtype, self.keep_fp32,
                          direct_ok)
        if self.budget is not None and plan.param_bytes + plan.nbytes > self.budget and worth_streaming(plan):
            plan = plan_layer(self.family, self.hf_config, i, self.reader, self.names, self.dtype, self.keep_fp32,
                              direct_ok, stream=True)
        return plan

    def read(self, i: int) -> RawLayer:
        """Layer i planned and its buffered bytes read (this rank's share of them under shared reads)."""
        t0 = time.monotonic()
        plan = self.plan(i)
        lo, hi = self.share.part(plan.nbytes) if self.share else (0, plan.nbytes)
        if self.device.type == "cuda":
            buf, got, ready = self._read_to_device(plan, plan.nbytes + (self.share.size if self.share else 0), lo, hi)
            raw = RawLayer(plan, buf, gathered=self.share is None, bytes_read=got, ready=ready)
            raw.times["read_bg_s"] = time.monotonic() - t0
            return raw
        if self._windowed(plan):  # read into the page cache now, into the parameters at assembly
            raw = RawLayer(plan, None, gathered=True, bytes_read=self._counted(warm_ranges(self.reader, self._pool,
                                                                                            plan.ranges)))
            raw.times["read_bg_s"] = time.monotonic() - t0
            return raw
        buf = self._buffer(plan.nbytes + (self.share.size if self.share else 0))
        got = self._read_ranges(plan, buf, lo, hi)
        raw = RawLayer(plan, buf, gathered=self.share is None, bytes_read=got)
        raw.times["read_bg_s"] = time.monotonic() - t0
        if self.share is not None and self.share.backend != "nccl":
            t1 = time.monotonic()
            _gather(self.share, buf, plan.nbytes)
            raw.gathered = True
            raw.times["gather_bg_s"] = time.monotonic() - t1
        return raw

    def _windowed(self, plan: LayerPlan) -> bool:
        """Whether layer `plan` is built on the host window by window (assemble_in_windows): without shared reads
        (those gather into the whole buffer) and without streamed experts (which keep their stored bytes)."""
        return self.device.type != "cuda" and self.share is None and not plan.streams

    def _window(self, metas: list[TensorMeta]) -> tuple[torch.Tensor, dict[str, int]]:
        """The stored bytes of `metas` read into the reused window buffer, each at a 64-byte aligned offset, from
        the page cache `read` filled (not counted in `bytes_read` again: the disk gave them once); the buffer and
        each tensor's offset."""
        offsets, end = {}, 0
        for m in metas:
            offsets[m.name] = end
            end += -(-m.nbytes // 64) * 64
        if self._buf is None or self._buf.numel() < end:
            self._buf = None
            self._buf = torch.empty(max(end, WINDOW_BYTES), dtype=torch.uint8)
        read_ranges(self.reader, self._pool, [ReadRange(m.shard, m.start, m.start + m.nbytes, offsets[m.name],
                                                        (m.name,)) for m in metas], self._buf)
        return self._buf, offsets

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The host layer buffer (allocated once, sized for the largest layer)."""
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            bound = max((buffer_bound(self.family, i, self.reader, self.names) for i in self._layers), default=0)
            self._buf = torch.empty(max(nbytes, bound + (self.share.size if self.share else 0)), dtype=torch.uint8)
        return self._buf

    def _read_to_device(self, plan: LayerPlan, size: int, lo: int, hi: int):
        """Buffer bytes [lo, hi) of `plan` read through the page-locked ring into a new device buffer (DeviceRing)."""
        if self._ring is None:
            self._ring = DeviceRing(self.device, self._pool)
        dev, got, ready = self._ring.read(self.reader, plan.ranges, size, lo, hi)
        return dev, self._counted(got), ready

    def _read_ranges(self, plan: LayerPlan, buf: torch.Tensor, lo: int, hi: int) -> int:
        """Read the plan's ranges, clipped to buffer bytes [lo, hi), into `buf`; the bytes read."""
        return self._counted(read_ranges(self.reader, self._pool, plan.ranges, buf, lo, hi))

    def _run_reads(self, jobs: list) -> int:
        futures = [self._pool.submit(self.reader.read_range, *job) for job in jobs]
        return self._counted(sum(f.result() for f in futures))

    def _counted(self, got: int) -> int:
        """`got` bytes read, added to `bytes_read` (reads run on the prefetch thread and the main one)."""
        with self._lock:
            self.bytes_read += got
        return got

    # -- assembling (main thread) -------------------------------------------------------------------------
    def assemble(self, raw: RawLayer) -> dict[str, torch.Tensor]:
        """Layer `raw.plan.index`'s state dict on the device; the buffer is free for the next read after it."""
        src = raw.buf
        if raw.ready is not None:  # a device buffer: its uploads (copy stream) come before any use here
            torch.cuda.current_stream(self.device).wait_event(raw.ready)
            src.record_stream(torch.cuda.current_stream(self.device))
        if not raw.gathered:  # NCCL: this rank's share is on the device; the node's all-gather fills the rest
            _gather(self.share, src, raw.plan.nbytes)
        def read_direct(pieces: list[Piece], params: dict[str, torch.Tensor]) -> None:
            raw.bytes_read += self._read_direct(pieces, params)

        if src is None:  # read window by window: the host never holds the layer's stored bytes whole
            return self._built(raw, assemble_in_windows(raw.plan, self._window, self.device, self._where,
                                                        read_direct, WINDOW_BYTES))
        raw.stores = stores_for(raw.plan.params, raw.plan.streams, self.device)
        return self._built(raw, assemble_layer(raw.plan, src, self.device, self._where, read_direct, raw.stores))

    def _built(self, raw: RawLayer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`params`, layer `raw`'s state dict, with its stored bytes counted as built."""
        self.source_bytes += raw.plan.source_bytes
        return params

    def _read_direct(self, pieces: list[Piece], params: dict[str, torch.Tensor]) -> int:
        """Read plain pieces stored in their parameter's dtype straight into the (host) parameters; the bytes."""
        jobs = []
        for p in pieces:
            m = p.source.meta
            dest = p.dest(params)
            if m.nbytes:
                jobs.append((m.shard, m.start, memoryview(dest_bytes(dest).numpy()), m.name))
        return self._run_reads(jobs)

    def _where(self, p: Piece) -> str:
        return p.source.where(self.reader)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._buf = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None


class DeviceRing:
    """RING_SLOTS page-locked chunks of READ_CHUNK bytes (allocated on first use) through which positioned reads
    stream into a device buffer, each chunk uploaded on a copy stream of its own as soon as it is read: the host
    holds a few hundred MB whatever the layer's size, and page-locking costs nothing per layer (page-locking a whole
    11-23 GB layer took 5-10 s on an H100 box)."""

    def __init__(self, device: torch.device, pool: ThreadPoolExecutor):
        self.device, self.pool = device, pool
        self._chunks: list[torch.Tensor] = []
        self._done: list[torch.cuda.Event] = []  # each chunk's last upload
        self._stream: torch.cuda.Stream | None = None

    def read(self, reader: CheckpointReader, ranges: list[ReadRange], size: int, lo: int = 0,
             hi: int | None = None) -> tuple[torch.Tensor, int, torch.cuda.Event]:
        """Buffer bytes [lo, hi) of `ranges` (file ranges and their buffer offsets, engine.calibrate.layer_plan)
        read into a new device buffer of `size` bytes. Returns the buffer, the bytes read and an event that passes
        once every upload is done: the stream that uses the buffer waits for it first."""
        hi = size if hi is None else hi
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
            for _ in range(RING_SLOTS):
                try:
                    self._chunks.append(torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=True))
                except RuntimeError:  # page-locking refused: pageable chunks, each upload just waits
                    self._chunks.append(torch.empty(READ_CHUNK, dtype=torch.uint8))
                self._done.append(torch.cuda.Event())
        stream = self._stream
        with torch.cuda.stream(stream):
            dev = torch.empty(size, dtype=torch.uint8, device=self.device)
        free = list(range(len(self._chunks)))
        pending: list = []  # (read future, slot, buffer offset, length), oldest first
        got = 0

        def upload_oldest() -> int:
            fut, slot, off, n = pending.pop(0)
            done = fut.result()
            with torch.cuda.stream(stream):
                dev[off:off + n].copy_(self._chunks[slot][:n], non_blocking=True)
                self._done[slot].record(stream)
            free.append(slot)
            return done

        for r in ranges:
            a, b = max(r.offset, lo), min(r.offset + r.nbytes, hi)
            for s in range(a, b, READ_CHUNK):
                n = min(READ_CHUNK, b - s)
                if not free:
                    got += upload_oldest()
                slot = free.pop(0)
                self._done[slot].synchronize()  # its last upload has left the chunk
                view = memoryview(self._chunks[slot].numpy()).cast("B")[:n]
                fut = self.pool.submit(reader.read_range, r.shard, r.start + s - r.offset, view, r.label)
                pending.append((fut, slot, s, n))
        while pending:
            got += upload_oldest()
        ready = torch.cuda.Event()
        ready.record(stream)
        return dev, got, ready

    def close(self) -> None:
        for ev in self._done:
            ev.synchronize()
        self._chunks, self._done = [], []


def read_ranges(reader: CheckpointReader, pool: ThreadPoolExecutor, ranges: list[ReadRange], buf: torch.Tensor,
                lo: int = 0, hi: int | None = None) -> int:
    """Buffer bytes [lo, hi) of `ranges` read into the host buffer `buf` (uint8), at most READ_CHUNK per positioned
    read, on `pool`'s threads; the bytes read."""
    view = memoryview(buf.numpy()).cast("B")
    hi = buf.numel() if hi is None else hi
    jobs = []
    for r in ranges:
        a, b = max(r.offset, lo), min(r.offset + r.nbytes, hi)
        for s in range(a, b, READ_CHUNK):
            jobs.append(pool.submit(reader.read_range, r.shard, r.start + s - r.offset,
                                    view[s:min(s + READ_CHUNK, b)], r.label))
    return sum(f.result() for f in jobs)


def warm_ranges(reader: CheckpointReader, pool: ThreadPoolExecutor, ranges: list[ReadRange]) -> int:
    """`ranges` read into the page cache (through a small buffer per read, which page cache is not RSS), for a
    build that reads them again window by window; the bytes read. A read, not posix_fadvise(WILLNEED): that hint
    can return at once and leave the cache cold (engine.startup.readahead)."""
    def warm(shard: str, start: int, n: int, label: str) -> int:
        scratch = _scratch()
        got = 0
        for s in range(0, n, len(scratch)):
            got += reader.read_range(shard, start + s, scratch[:min(len(scratch), n - s)], label)
        return got

    jobs = [pool.submit(warm, r.shard, r.start + s, min(READ_CHUNK, r.nbytes - s), r.label)
            for r in ranges for s in range(0, r.nbytes, READ_CHUNK)]
    return sum(f.result() for f in jobs)


_tls = threading.local()


def _scratch() -> memoryview:
    """This thread's WARM_CHUNK-byte buffer for warm_ranges."""
    buf = getattr(_tls, "scratch", None)
    if buf is None:
        buf = _tls.scratch = memoryview(bytearray(WARM_CHUNK))
    return buf


def _gather(share: ReadShare, buf: torch.Tensor, nbytes: int) -> None:
    """All-gather the ranks' shares of buffer bytes [0, nbytes) in place."""
    import torch.distributed as dist

    per = -(-nbytes // share.size)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(buf[:per * share.size], buf[share.rank * per:(share.rank + 1) * per], group=share.group)
