"""The convert stage: weight-only NVFP4 (and, through subclasses, dequant to BF16 and cast to FP8-block),
a thin adapter over engine.convert.convert_checkpoint (the function `quantdeck convert` calls).

params: src, dst, to, layouts, shard_mb, device. Units: output shards (kept when in the manifest with a
matching sha256), so a killed worker's rerun redoes only the shards that were not finished. Under torchrun
(several nodes or GPUs: the plan marks it distributed) every rank writes its share of the shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.convert import convert_checkpoint
from engine.convert.device import start_early
from engine.core.names import StageName
from engine.stages._common import check_checkpoint_dir, output_dirs, small
from engine.stages.base import Stage, StageContext


class _ConvertBase(Stage):
    to: str = "nvfp4"
    distributed = True  # with several nodes/GPUs its shards are split over torchrun ranks (engine.convert.ranks)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        p = ctx.params
        to, device = p.get("to") or self.to, p.get("device") or "auto"
        # as `quantdeck convert` starts: the source read ahead and CUDA started while torch is imported (on an H100
        # a run's convert stage took 1.1-1.5 s longer than the command without); not with several ranks, each of
        # which would open its context on the first GPU and read the same bytes
        if ctx.world_size == 1:
            start_early(p["src"], device, to)
        res = convert_checkpoint(p["src"], p["dst"], to=to, layouts=tuple(p.get("layouts") or ("modelopt",)),
                                 device=device, shard_size=int(float(p.get("shard_mb") or 5000) * 10**6),
                                 sink=ctx.sink)
        return small(res)

    def check_saved(self, ctx: StageContext) -> list[str]:
        out: list[str] = []
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            out.extend(check_checkpoint_dir(Path(d)))
        return out


@Stage.register(StageName.CONVERT)
class ConvertStage(_ConvertBase):
    to = "nvfp4"
