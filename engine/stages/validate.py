"""The validate stage: check the produced checkpoint(s) against the source, engine.convert.validate_checkpoint
(the function `quantdeck validate` calls); with an amax snapshot, also H's amax check when present.
Unit: the stage. validate-only checks manifests and shard checksums, without loading the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import ValidationFailedError
from engine.fsutil import atomic_write_json
from engine.names import StageName
from engine.stages._common import call_with_sink, check_checkpoint_dir, jsonable, output_dirs, small
from engine.stages.base import Stage, StageContext


def _failed(report: Any) -> list[str]:
    r = jsonable(report)
    if isinstance(r, dict):
        if r.get("ok") is False or r.get("passed") is False:
            errs = r.get("failures") or r.get("errors") or r.get("problems") or ["validation failed"]
            return [str(e) for e in errs]
    return []


@Stage.register(StageName.VALIDATE)
class ValidateStage(Stage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.convert import validate_checkpoint

        p = ctx.params
        reports: dict[str, Any] = {}
        problems: list[str] = []
        for d in output_dirs(p["dst"], p.get("layouts")):
            rep = call_with_sink(validate_checkpoint, str(d), against=p.get("src"), sink=ctx.sink)
            reports[str(d)] = jsonable(rep)
            problems += [f"{d}: {x}" for x in _failed(rep)]
        if p.get("amax"):
            try:
                from engine.export import validate_amax  # engineer H's snapshot check, when present
            except ImportError:
                validate_amax = None
            if validate_amax is not None:
                rep = call_with_sink(validate_amax, p["amax"], model=p.get("src"), sink=ctx.sink)
                reports["amax"] = jsonable(rep)
                problems += [f"amax: {x}" for x in _failed(rep)]
        if p.get("report"):
            atomic_write_json(p["report"], reports)
        if problems:
            raise ValidationFailedError(f"{len(problems)} problem(s): " + "; ".join(problems[:5]),
                                        at=str(p["dst"]), hint="see the stage report; resume redoes broken units")
        return small({"outputs": list(reports)})

    def check_saved(self, ctx: StageContext) -> list[str]:
        p = ctx.params
        out: list[str] = []
        for d in output_dirs(p["dst"], p.get("layouts")):
            out.extend(check_checkpoint_dir(Path(d)))
        return sorted(set(out))
