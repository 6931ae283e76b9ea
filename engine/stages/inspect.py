"""The inspect stage: what the source is (family, layout, counts, anomalies, size estimates), engine.checkpoint.inspect
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
    try:
        from engine.checkpoint import inspect as insp
    except ImportError:
        insp = None
    fn = None
    for name in ("inspect_checkpoint", "inspect", "inspect_dir", "run_inspect"):
        fn = getattr(insp, name, None) if insp is not None else None
        if callable(fn):
            break
    if fn is not None:
        rep = jsonable(call_with_sink(fn, src, sink=sink))
        return rep if isinstance(rep, dict) else {"report": rep}
    # engine.checkpoint.inspect not there yet: the essentials from the reader and the model layout
    from engine.checkpoint.reader import CheckpointReader
    from engine.models.detect import config_mismatches, detect_layout, role_counts

    r = CheckpointReader(src)
    names = list(r.names())
    layout = detect_layout(r.config, names)
    return {"family": str(layout.family), "tensors": len(names), "roles": role_counts(layout, names),
            "bytes": sum(r.meta(n).nbytes for n in names),
            "anomalies": [m.msg for m in config_mismatches(layout, names)]}


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
            ctx.sink.emit("log", level="warning", msg=f"recipe says model.family = {want}, the checkpoint looks like {fam}")
        if fam:
            from engine.runs.runner import update_meta
            from engine.runs.rundir import RunDir

            update_meta(RunDir(Path(ctx.run_dir)), family=str(want or fam))
        return {"family": fam, "report": ctx.params.get("report"),
                "anomalies": len(rep.get("anomalies") or []) if isinstance(rep, dict) else None}

    def check_saved(self, ctx: StageContext) -> list[str]:
        rep = ctx.params.get("report")
        if rep and not Path(rep).exists():
            return [f"report {rep} is missing"]
        if rep and read_json(rep) is None:
            return [f"report {rep} is unreadable"]
        return []
