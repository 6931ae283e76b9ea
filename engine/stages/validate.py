"""The validate stage: check the produced checkpoint(s) against the source, engine.convert.validate_checkpoint
(the function `quantdeck validate` calls); with an amax snapshot, also the calibration's amax check.
Unit: the stage. validate-only checks manifests and shard checksums, without loading the model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from engine.convert import validate_checkpoint
from engine.convert.block_child import WARM_SOCKET
from engine.convert.validate_follow import Follower
from engine.core.errors import ValidationFailedError
from engine.core.fsutil import atomic_write_json
from engine.core.names import StageName
from engine.stages._common import call_with_sink, check_checkpoint_dir, jsonable, output_dirs, small
from engine.stages.base import Stage, StageContext


def _failed(report: Any) -> list[str]:
    r = jsonable(report)
    if isinstance(r, dict) and (r.get("ok") is False or r.get("passed") is False):
        errs = r.get("failures") or r.get("errors") or r.get("problems") or ["validation failed"]
        return [f"{e.get('msg')}" + (f" [{e.get('at')}]" if e.get("at") else "") if isinstance(e, dict) else str(e)
                for e in errs]
    return []


def block_check_args(params: dict[str, Any]) -> tuple[str, str] | None:
    """(source, device) of the decoder-block check the stage runs with `params` (ctx.params), None without a
    source: what the driver warms a child up for (engine.convert.block_child.start_warm). The device is the
    recipe's, "auto" (a GPU where torch sees one) when it names none, as `quantdeck validate --device`."""
    if not params.get("src"):
        return None
    return str(params["src"]), str(params.get("device") or "auto")


class _Following(dict):
    """Output directory -> its Follower (ValidateStage.ahead); `stop` ends them all (engine.runs.worker, on every
    way out of the stage)."""

    def stop(self) -> None:
        for f in self.values():
            f.stop()


@Stage.register(StageName.VALIDATE)
class ValidateStage(Stage):
    def ahead(self, params: dict[str, Any]) -> "_Following | None":
        """Started ahead beside the stage that writes the output: each output's shards checked as they are
        finished (engine.convert.validate_follow), so that little is left to read when the stage begins."""
        if not params.get("dst"):
            return None
        dirs = output_dirs(params["dst"], params.get("layouts"))
        return _Following({str(d): Follower(d, params.get("src")).start() for d in dirs})

    def run(self, ctx: StageContext) -> dict[str, Any]:
        p = ctx.params
        reports: dict[str, Any] = {}
        problems: list[str] = []
        followers = ctx.ahead or {}  # the worker stops them all, whichever way the stage ends
        for d in output_dirs(p["dst"], p.get("layouts")):
            kw: dict[str, Any] = {"against": p.get("src")}
            if str(d) in followers:  # what was checked while the output was written
                f = followers[str(d)]
                kw["earlier"] = f.stop()
                if f.error:
                    print(f"quantdeck validate: {d}: stopped following the output early ({f.error})",
                          file=sys.stderr, flush=True)
            if p.get("amax"):
                kw["amax"] = p["amax"]  # the snapshot is checked against the model's layers too
            if p.get("src"):  # the driver's warm child, where it started one (engine.runs.runner)
                kw["device"] = block_check_args(p)[1]
                kw["block_socket"] = str(ctx.stage_dir / WARM_SOCKET)
            rep = call_with_sink(validate_checkpoint, str(d), sink=ctx.sink, **kw)
            if "earlier" in kw:  # the log only: the events and the report are those of a validate without
                print(f"quantdeck validate: {d}: {kw['earlier'].taken} module(s) and tensor(s) checked as the output "
                      f"was written, of {len(kw['earlier'].found)} found then", file=sys.stderr, flush=True)
            reports[str(d)] = jsonable(rep)
            problems += [f"{d}: {x}" for x in _failed(rep)]
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
