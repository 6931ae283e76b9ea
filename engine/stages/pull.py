"""The pull stage: the recipe's `source = "s3://…"` into the run's local copy (engine.s3.pull)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.checkpoint.verify import check_tree
from engine.core.fsutil import read_json
from engine.core.names import StageName
from engine.stages.base import Stage, StageContext
from engine.stages.push import stage_params, transfer_kwargs


@Stage.register(StageName.PULL)
class PullStage(Stage):
    """params: inputs.url (or url), outputs.dir (or dst); options endpoint_url, part_size (or part_size_mb),
    concurrency, reserve_bytes (room to leave free for later stages) — all optional."""

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.s3 import pull

        ins, outs, opts = stage_params(ctx.params)
        res = pull(ins["url"], _dst(outs), manifest=Path(ctx.stage_dir) / "transfer.json", sink=ctx.sink,
                   **transfer_kwargs(opts, pull=True))
        return res.summary()

    def check_saved(self, ctx: StageContext) -> list[str]:
        ins, outs, _ = stage_params(ctx.params)
        dst = Path(_dst(outs))
        problems = []
        if not dst.is_dir():
            problems.append(f"{dst} is missing (pull not finished)")
        man = read_json(Path(ctx.stage_dir) / "transfer.json", default={}) or {}
        if not man.get("complete"):
            problems.append(f"the transfer manifest of {ins.get('url')} is not complete")
        for rel, e in (man.get("objects") or {}).items():
            f = dst / rel
            if not f.is_file() or f.stat().st_size != e.get("size"):
                problems.append(f"{f}: missing or wrong size")
        if dst.is_dir() and not problems:
            problems += [f"{dst / d.rel}: {d.what}" for d in check_tree(dst, digests=False)]
        return problems


def _dst(outs: dict[str, Any]) -> str:
    return outs.get("dst") or outs["dir"]
