"""The inspect stage: what the source is (family, layout, counts, anomalies, size estimates), engine.models.inspect
(the function `quantdeck inspect` calls). Writes report.json; the detected family goes into run.json.
Unit: the stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.errors import CheckpointError
from engine.core.fsutil import atomic_write_json, read_json
from engine.core.names import StageName
from engine.stages._common import call_with_sink, jsonable
from engine.stages.base import Stage, StageContext


def _inspect(src: str, sink: Any) -> dict[str, Any]:
    from engine.models.inspect import inspect_checkpoint

    rep = jsonable(call_with_sink(inspect_checkpoint, src, sink=sink))
    return rep if isinstance(rep, dict) else {"report": rep}


@Stage.register(StageName.INSPECT)
class InspectStage(Stage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        src = ctx.params["model"]
        if not Path(src).is_dir():
            raise CheckpointError(f"source {src} does not exist", at=src, hint="check source.path in the recipe")
        rep = _inspect(src, ctx.sink)
        if ctx.params.get("report"):
            atomic_write_json(ctx.params["report"], rep)
        fam = rep.get("family") if isinstance(rep, dict) else None
        want = ctx.params.get("family")
        if want and fam and str(fam) != str(want) and str(fam) != "generic":
            ctx.sink.emit("log", level="warning",
                          msg=f"recipe says model.family = {want}, the checkpoint looks like {fam}")
        if fam:
            ctx.update_meta(family=str(want or fam))
        return {"family": fam, "report": ctx.params.get("report"),
                "anomalies": len(rep.get("anomalies") or []) if isinstance(rep, dict) else None}

    def check_saved(self, ctx: StageContext) -> list[str]:
        rep = ctx.params.get("report")
        if rep and not Path(rep).exists():
            return [f"report {rep} is missing"]
        if rep and read_json(rep) is None:
            return [f"report {rep} is unreadable"]
        return []
