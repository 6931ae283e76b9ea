"""torch.distributed for calibration: one process or any number of torchrun ranks (NCCL on GPUs, gloo on CPUs).

Every collective has a timeout, the run's `[run] stall_after_s` (the worker passes it in the environment,
QUANTDECK_COLLECTIVE_TIMEOUT_S): a rank that never joins makes the others fail with a timeout error
(classified `nccl-timeout` by engine.runs.rootcause), which `quantdeck resume` recovers from, instead of a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from engine.core.settings import settings


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" = not distributed
    owns_group: bool = False  # we initialized the process group and destroy it at the end

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "max") -> torch.Tensor:
        """In-place all-reduce of `t` (on this rank's device) with MAX or SUM; returns it."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj):
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device(device)


def collective_timeout(timeout_s: float | None = None) -> timedelta | None:
    """The collectives' timeout: `timeout_s`, else the environment's (QUANTDECK_COLLECTIVE_TIMEOUT_S), else None
    (torch's defaults)."""
    if timeout_s is None:
        timeout_s = settings().collective_timeout_s
    return timedelta(seconds=timeout_s) if timeout_s and timeout_s > 0 else None


def _default_group_timeout(timeout: timedelta) -> None:
    """Groups made later without a timeout (the layer reader's node group) take torch's module default:
    set it to ours, so no collective of this process waits longer."""
    import torch.distributed.distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the group when there are ranks.
    `timeout_s`: how long any collective may wait (default: `collective_timeout()`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    ctx = DistContext(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, device=dev)
    if world > 1:
        import torch.distributed as dist

        ctx.backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw: dict = {"device_id": dev} if dev.type == "cuda" else {}
            timeout = collective_timeout(timeout_s)
            if timeout is not None:
                kw["timeout"] = timeout
                _default_group_timeout(timeout)
            dist.init_process_group(ctx.backend, **kw)
            ctx.owns_group = True
    return ctx


def reduce_amax(ctx: DistContext, amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAX over ranks; a quantizer missing on some rank counts as 0 there (amax is never negative)."""
    shapes = {k: tuple(v.shape) for k, v in amax.items()}
    merged: dict[str, tuple] = {}
    for s in ctx.all_gather_object(shapes):
        merged.update(s)
    keys = sorted(merged)
    dev = next(iter(amax.values())).device if amax else ctx.device
    if ctx.active:
        dev = ctx.device
    flat = torch.cat([(amax[k].reshape(-1) if k in amax else torch.zeros(max(1, int(torch.tensor(merged[k]).prod()))))
                      .to(dev, torch.float32) for k in keys]) if keys else torch.zeros(0, device=dev)
    ctx.all_reduce(flat, "max")
    flat = flat.cpu()  # one copy back (one device sync), not one per quantizer
    out, pos = {}, 0
    for k in keys:
        n = max(1, int(torch.tensor(merged[k]).prod())) if merged[k] else 1
        out[k] = flat[pos:pos + n].reshape(merged[k])
        pos += n
    return out


def reduce_coverage(ctx: DistContext, cov: dict[str, list[int]]) -> dict[str, list[int]]:
    if not ctx.active or not cov:
        return cov
    keys = sorted(cov)
    flat = torch.tensor([c for k in keys for c in cov[k]], dtype=torch.float64 if ctx.backend == "gloo"
                        else torch.float32, device=ctx.device)
    ctx.all_reduce(flat, "sum")
    vals = [int(round(v)) for v in flat.cpu().tolist()]
    out, pos = {}, 0
    for k in keys:
        out[k] = vals[pos:pos + len(cov[k])]
        pos += len(cov[k])
    return out
