"""The inject-mtp stage: copy the shared embedding and head into the MTP layer where the output lacks them
(seed 000 step 7), engine.convert.inject_mtp (the function `quantdeck inject-mtp` calls). Unit: the stage."""

from __future__ import annotations

from typing import Any

from engine.names import StageName
from engine.stages._common import call_with_sink, output_dirs, small
from engine.stages.base import Stage, StageContext


@Stage.register(StageName.INJECT_MTP)
class InjectMtpStage(Stage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.convert import inject_mtp

        res = {}
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            res[str(d)] = small(call_with_sink(inject_mtp, ctx.params["src"], str(d), sink=ctx.sink))
        return res
