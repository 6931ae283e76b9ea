"""The stage adapters, in process on tiny real checkpoints: each calls its library function with the plan's
params, reruns are idempotent, and check_saved (validate-only) spots what is broken without changing it."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from engine.core.events import CallbackSink
from engine.runs.plan import build_plan
from engine.runs.recipe import loads_recipe
from engine.runs.rundir import RunDir
from engine.runs.runner import update_meta
from engine.runs.worker import load_stage_class
from engine.stages.base import StageContext


def _ctx(tmp_path: Path, src: Path, stage: str, fmt: str = "nvfp4", layouts='["modelopt"]', events=None):
    r = loads_recipe(f'[run]\nworkdir = "{tmp_path / "w"}"\ndevice = "cpu"\n[source]\npath = "{src}"\n'
                     f'[target]\nformat = "{fmt}"\nlayouts = {layouts}\noutput = "{tmp_path / "out"}"\n'
                     'shard_mb = 0.2\n')
    run_dir = tmp_path / "w" / "runs" / "r"
    (run_dir / "stages" / stage).mkdir(parents=True, exist_ok=True)
    if not (run_dir / "run.json").exists():
        (run_dir / "run.json").write_text("{}")
    plan = build_plan(r, run_id="r", run_dir=run_dir, base=tmp_path)
    sink = CallbackSink(events.append) if events is not None else CallbackSink(lambda e: None)
    return StageContext(run_dir=run_dir, stage_dir=run_dir / "stages" / stage, params=plan.stage(stage).params,
                        sink=sink, update_meta=partial(update_meta, RunDir(run_dir))), plan  # as the worker does


@pytest.mark.parametrize("stage, fmt, src_dtype, want", [
    ("dequant", "bf16", "fp8", "BF16"),
    ("cast-fp8", "fp8-block", "bf16", "F8_E4M3"),
])
def test_dequant_and_cast_fp8(tmp_path, tiny_ckpt, stage, fmt, src_dtype, want):
    src = tiny_ckpt("deepseek-v3", src_dtype)
    events = []
    ctx, plan = _ctx(tmp_path, src, stage, fmt, events=events)
    res = load_stage_class(stage)().run(ctx)
    assert res["target"] == fmt and any(e.kind == "progress" for e in events)
    from engine.checkpoint.reader import CheckpointReader

    r = CheckpointReader(plan.output)
    dts = {r.meta(n).dtype_name for n in r.names() if n.endswith("mlp.experts.0.up_proj.weight")}
    assert dts == {want}
    assert load_stage_class(stage)().check_saved(ctx) == []
    again = load_stage_class(stage)().run(ctx)  # a rerun keeps what is done
    assert again["shards_written"] == 0


def test_weight_only_tail_stages_and_validate_only(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    for stage in ("inspect", "convert", "inject-mtp", "copy-extras", "validate"):
        ctx, plan = _ctx(tmp_path, src, stage)
        res = load_stage_class(stage)().run(ctx)
        json.dumps(res)  # small and JSON-able for status.json
        assert load_stage_class(stage)().check_saved(ctx) == [], stage
    assert json.loads((tmp_path / "w/runs/r/run.json").read_text())["family"] == "deepseek-v3"
    report = json.loads((tmp_path / "w/runs/r/stages/validate/report.json").read_text())
    assert report[plan.output]["ok"] is True
    # a corrupted shard: check_saved names it, and changes nothing
    shard = sorted(Path(plan.output).glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    ctx, _ = _ctx(tmp_path, src, "validate")
    probs = load_stage_class("validate")().check_saved(ctx)
    assert len(probs) == 1 and shard.name in probs[0] and "sha256" in probs[0]
    assert shard.read_bytes() == bytes(data)


def test_both_layouts_go_to_subdirs(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    ctx, plan = _ctx(tmp_path, src, "convert", layouts='["modelopt", "compressed-tensors"]')
    load_stage_class("convert")().run(ctx)
    for lay in ("modelopt", "compressed-tensors"):
        assert (Path(plan.output) / lay / "model.safetensors.index.json").exists()
    ctx, _ = _ctx(tmp_path, src, "copy-extras", layouts='["modelopt", "compressed-tensors"]')
    assert load_stage_class("copy-extras")().check_saved(ctx) == []


def test_the_convert_stage_starts_as_the_command_does(tmp_path, tiny_ckpt, monkeypatch):
    """The convert stage's worker starts the way `quantdeck convert` does: the source's read-ahead and the device
    begin before the conversion (and its imports of torch), and idle OpenMP threads are asked to sleep unless the
    operator said otherwise; a stage split over several ranks leaves that out (each rank would open its context on
    the first GPU and read the same bytes)."""
    import os

    from engine.stages import convert as stage_mod

    src = tiny_ckpt("deepseek-v3", "fp8")
    order: list[tuple] = []
    start, conv = stage_mod.start_early, stage_mod.convert_checkpoint
    monkeypatch.setattr(stage_mod, "start_early",
                        lambda *a, **k: (order.append(("start_early", *a)), start(*a, **k))[1])
    monkeypatch.setattr(stage_mod, "convert_checkpoint",
                        lambda *a, **k: (order.append(("convert",)), conv(*a, **k))[1])
    for var in ("OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)  # unset (and restored after the test)
    ctx, _ = _ctx(tmp_path, src, "convert")
    load_stage_class("convert")().run(ctx)
    assert order == [("start_early", str(src), "cpu", "nvfp4"), ("convert",)]
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the operator's
    order.clear()
    load_stage_class("convert")().run(ctx)
    assert order[0][0] == "start_early" and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    order.clear()
    load_stage_class("convert")().run(replace(ctx, world_size=2))
    assert order == [("convert",)]
