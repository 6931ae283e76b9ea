"""The copy-extras stage: the source's non-safetensors files (tokenizer, generation config, code) into
every output dir that lacks them (engine.convert.copy_extras). Unit: the stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.convert.extras import copy_extras, extra_files
from engine.core.names import StageName
from engine.stages._common import output_dirs
from engine.stages.base import Stage, StageContext


@Stage.register(StageName.COPY_EXTRAS)
class CopyExtrasStage(Stage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        copied: dict[str, list[str]] = {}
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            copied[str(d)] = list(copy_extras(ctx.params["src"], d, sink=ctx.sink) or [])
        return {"copied": copied}

    def check_saved(self, ctx: StageContext) -> list[str]:
        src = Path(ctx.params["src"])
        if not src.is_dir():
            return [f"source {src} is missing"]
        out = []
        for d in output_dirs(ctx.params["dst"], ctx.params.get("layouts")):
            missing = [str(r) for r in extra_files(src) if not (d / r).exists()]
            if missing:
                out.append(f"{d} lacks {len(missing)} extra file(s): {', '.join(missing[:5])}")
        return out
