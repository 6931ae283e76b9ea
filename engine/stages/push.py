"""The push stage: the finished checkpoint to the recipe's `[push] target = "s3://…"` (engine.s3.push)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.names import StageName
from engine.stages.base import Stage, StageContext


def transfer_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """The optional transfer knobs of a pull/push stage's params; absent or None → engine.s3's defaults."""
    out: dict[str, Any] = {}
    for name in ("endpoint_url", "part_size", "concurrency", "part_concurrency", "retries", "profile"):
        if params.get(name) is not None:
            out[name] = params[name]
    return out


@Stage.register(StageName.PUSH)
class PushStage(Stage):
    """params: src (local dir), url (s3://bucket/prefix), endpoint_url, part_size, concurrency (optional)."""

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.s3 import push

        p = ctx.params
        res = push(p["src"], p["url"], manifest=Path(ctx.stage_dir) / "transfer.json", sink=ctx.sink,
                   **transfer_kwargs(p))
        return res.summary()

    def check_saved(self, ctx: StageContext) -> list[str]:
        from engine.fsutil import read_json

        man = read_json(Path(ctx.stage_dir) / "transfer.json", default={}) or {}
        return [] if man.get("complete") else [f"push to {ctx.params.get('url')} is not complete"]
