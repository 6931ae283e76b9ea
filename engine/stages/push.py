"""The push stage: the finished checkpoint to the recipe's `[push] target = "s3://…"` (engine.s3.push)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.fsutil import read_json
from engine.core.names import StageName
from engine.stages.base import Stage, StageContext


def stage_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(inputs, outputs, options) of a plan's stage params; flat params (url/dst/src at top level) count as all."""
    flat = {k: v for k, v in params.items() if k not in ("inputs", "outputs", "options")}
    return ({**flat, **(params.get("inputs") or {})}, {**flat, **(params.get("outputs") or {})},
            {**flat, **(params.get("options") or {})})


def transfer_kwargs(options: dict[str, Any], pull: bool = False) -> dict[str, Any]:
    """The optional transfer knobs of a pull/push stage; absent or None → engine.s3's defaults."""
    out: dict[str, Any] = {}
    names = ["endpoint_url", "part_size", "concurrency", "part_concurrency", "retries", "profile"]
    if pull:
        names.append("reserve_bytes")
    for name in names:
        if options.get(name) is not None:
            out[name] = options[name]
    if out.get("part_size") is None and options.get("part_size_mb"):
        out["part_size"] = int(options["part_size_mb"]) << 20
    return out


@Stage.register(StageName.PUSH)
class PushStage(Stage):
    """params: inputs.dir (or src), outputs.url (or url); options endpoint_url, part_size (or part_size_mb),
    concurrency — all optional."""

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.s3 import push

        ins, outs, opts = stage_params(ctx.params)
        res = push(ins.get("src") or ins["dir"], outs["url"], manifest=Path(ctx.stage_dir) / "transfer.json",
                   sink=ctx.sink, **transfer_kwargs(opts))
        return res.summary()

    def check_saved(self, ctx: StageContext) -> list[str]:
        man = read_json(Path(ctx.stage_dir) / "transfer.json", default={}) or {}
        url = stage_params(ctx.params)[1].get("url")
        return [] if man.get("complete") else [f"push to {url} is not complete"]
