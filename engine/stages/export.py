"""The export stage: engine.export.export_checkpoint (what `quantdeck export` calls) — W4A4 NVFP4 from the
amax snapshot; also what export-only re-runs.

params: src, amax, dst; options layouts, shard_mb, device. Units: output shards (resumable, as convert).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.names import StageName
from engine.stages._common import check_checkpoint_dir, output_dirs, small
from engine.stages.base import Stage, StageContext


@Stage.register(StageName.EXPORT)
class ExportStage(Stage):
    distributed = True  # with several nodes/GPUs its shards are split over torchrun ranks (engine.convert.ranks)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.export.api import export_checkpoint  # torch

        p = ctx.params
        res = export_checkpoint(p["src"], p["amax"], p["dst"], layouts=tuple(p.get("layouts") or ("modelopt",)),
                                sink=ctx.sink, device=p.get("device") or "auto",
                                shard_size=int(float(p.get("shard_mb") or 5000) * 10**6))
        return small(res)

    def check_saved(self, ctx: StageContext) -> list[str]:
        out: list[str] = []
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            out.extend(check_checkpoint_dir(Path(d)))
        return out
