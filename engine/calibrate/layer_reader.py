"""Calibration's layer reader: a layer's stored bytes read once, as stored, then assembled on the device.

`LayerReader.read(i)` (on the prefetch thread, while layer i-1 computes) plans layer i (engine.calibrate.
layer_plan) and fills one flat host buffer with its stored bytes: large positioned reads of the plan's
coalesced ranges, split over a few threads (os.preadv releases the GIL). On a GPU the buffer is one
page-locked allocation sized for the largest layer and reused for every layer; on the host it is
ordinary memory, and plain pieces already in the parameter's dtype are not buffered at all but read
straight into the parameters at assembly (so a host build holds the raw encoded bytes of one layer plus
its parameters, never a second decoded copy).

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

from engine.calibrate.layer import keep_fp32
from engine.calibrate.layer_assemble import assemble_layer, dest_bytes
from engine.calibrate.layer_plan import LayerPlan, Piece, buffer_bound, plan_layer
from engine.checkpoint.reader import CheckpointReader

READ_THREADS = 6
READ_CHUNK = 32 << 20  # one positioned read at most; larger ranges are split over the threads


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
    buf: torch.Tensor
    gathered: bool
    times: dict[str, float] = field(default_factory=dict)
    bytes_read: int = 0


class LayerReader:
    """Reads and assembles the decoder layers of `family` from `reader` (see the module docstring)."""

    def __init__(self, reader: CheckpointReader, family, hf_config, dtype: torch.dtype, device: torch.device,
                 layers: range, threads: int = READ_THREADS, direct: bool | None = None):
        """`layers`: the layers to be read (the buffer is sized for the largest); `direct`: read plain pieces
        straight into host parameters (None: on a host build without shared reads)."""
        self.reader, self.family, self.hf_config = reader, family, hf_config
        self.dtype, self.device = dtype, device
        self.names = set(reader.names())
        self.keep_fp32 = keep_fp32(family, dtype)
        self.share: ReadShare | None = None
        self.direct = direct
        self.bytes_read = 0
        self.source_bytes = 0  # stored bytes of the layers built
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="calib-read")
        self._layers = layers
        self._buf: torch.Tensor | None = None
        self._released: torch.cuda.Event | None = None  # the last assembly's uploads from the buffer are done

    def share_reads(self, share: ReadShare | None) -> None:
        """Read 1/R of every layer and gather the rest from the ranks of `share` (call before the first read)."""
        self.share = share

    # -- reading (prefetch thread) ------------------------------------------------------------------------
    def plan(self, i: int) -> LayerPlan:
        host = self.device.type != "cuda"
        direct_ok = (host and self.share is None) if self.direct is None else (host and self.direct)
        return plan_layer(self.family, self.hf_config, i, self.reader, self.names, self.dtype, self.keep_fp32,
                          direct_ok)

    def read(self, i: int) -> RawLayer:
        """Layer i planned and its buffered bytes read (this rank's share of them under shared reads)."""
        t0 = time.monotonic()
        plan = self.plan(i)
        buf = self._buffer(plan.nbytes + (self.share.size if self.share else 0))
        lo, hi = self.share.part(plan.nbytes) if self.share else (0, plan.nbytes)
        got = self._read_ranges(plan, buf, lo, hi)
        raw = RawLayer(plan, buf, gathered=self.share is None, bytes_read=got)
        raw.times["read_bg_s"] = time.monotonic() - t0
        if self.share is not None and self.share.backend != "nccl":
            t1 = time.monotonic()
            _gather(self.share, buf, plan.nbytes)
            raw.gathered = True
            raw.times["gather_bg_s"] = time.monotonic() - t1
        return raw

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """The layer buffer (allocated once, page-locked on a GPU), free of the last assembly's uploads."""
        if self._released is not None:
            self._released.synchronize()
            self._released = None
        if self._buf is None or self._buf.numel() < nbytes:
            self._buf = None
            bound = max((buffer_bound(self.family, i, self.reader, self.names) for i in self._layers), default=0)
            size = max(nbytes, bound + (self.share.size if self.share else 0))
            pin = self.device.type == "cuda"
            try:
                self._buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            except RuntimeError:  # page-locking refused: pageable, the upload just waits
                self._buf = torch.empty(size, dtype=torch.uint8)
        return self._buf

    def _read_ranges(self, plan: LayerPlan, buf: torch.Tensor, lo: int, hi: int) -> int:
        """Read the plan's ranges, clipped to buffer bytes [lo, hi), into `buf`; the bytes read."""
        view = memoryview(buf.numpy()).cast("B")
        jobs = []
        for r in plan.ranges:
            a, b = max(r.offset, lo), min(r.offset + r.nbytes, hi)
            for s in range(a, b, READ_CHUNK):
                e = min(s + READ_CHUNK, b)
                what = ", ".join(r.names[:3]) + (", …" if len(r.names) > 3 else "")
                jobs.append((r.shard, r.start + s - r.offset, view[s:e], what))
        return self._run_reads(jobs)

    def _run_reads(self, jobs: list) -> int:
        futures = [self._pool.submit(self.reader.read_range, *job) for job in jobs]
        got = sum(f.result() for f in futures)
        with self._lock:
            self.bytes_read += got
        return got

    # -- assembling (main thread) -------------------------------------------------------------------------
    def assemble(self, raw: RawLayer) -> dict[str, torch.Tensor]:
        """Layer `raw.plan.index`'s state dict on the device; the buffer is free for the next read after it."""
        src = raw.buf
        if not raw.gathered:  # NCCL: this rank's share up, then the node's all-gather on the device
            lo, hi = self.share.part(raw.plan.nbytes)
            src = torch.empty((hi - lo) * self.share.size, dtype=torch.uint8, device=self.device)
            src[lo:hi].copy_(raw.buf[lo:hi], non_blocking=True)
            _gather(self.share, src, raw.plan.nbytes)
        def read_direct(pieces: list[Piece], params: dict[str, torch.Tensor]) -> None:
            raw.bytes_read += self._read_direct(pieces, params)

        params = assemble_layer(raw.plan, src, self.device, self._where, read_direct)
        if self.device.type == "cuda":
            self._released = torch.cuda.Event()
            self._released.record()
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


def _gather(share: ReadShare, buf: torch.Tensor, nbytes: int) -> None:
    """All-gather the ranks' shares of buffer bytes [0, nbytes) in place."""
    import torch.distributed as dist

    per = -(-nbytes // share.size)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(buf[:per * share.size], buf[share.rank * per:(share.rank + 1) * per], group=share.group)
