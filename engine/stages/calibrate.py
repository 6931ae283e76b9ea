"""The calibrate stage: engine.calibrate.calibrate (what `quantdeck calibrate` calls), under torchrun on every node.

params: model, samples, amax (out dir); options num_samples, seq_len, batch_size, quant_cfg, all_experts,
device. Unit: a decoder layer (`amax/layer_NNN.safetensors`), so a rerun starts after the last saved one.
"""

from __future__ import annotations

from typing import Any

from engine.core.names import StageName
from engine.stages.base import Stage, StageContext


@Stage.register(StageName.CALIBRATE)
class CalibrateStage(Stage):
    distributed = True

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.calibrate.streaming import calibrate

        p = ctx.params
        return calibrate(p["model"], p["samples"], p["amax"], num_samples=p.get("num_samples"),
                         seq_len=int(p.get("seq_len") or 512), batch_size=int(p.get("batch_size") or 1),
                         quant_cfg=p.get("quant_cfg") or "NVFP4_DEFAULT_CFG", all_experts=bool(p.get("all_experts")),
                         device=p.get("device") or "auto", sink=ctx.sink)

    def check_saved(self, ctx: StageContext) -> list[str]:
        from engine.calibrate.validate import validate_amax

        return list(validate_amax(ctx.params["amax"], ctx.params.get("model"))["problems"])
