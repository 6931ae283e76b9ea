"""kill -9 the dequant (FP8 → BF16) and cast-fp8 (BF16 → FP8-block) workers mid-way, `quantdeck resume`, and the
outputs are byte-identical to the same conversion done in one go; the history shows the killed attempt with
its root cause, then the successful one. Real processes: the CLI, the detached driver and the workers."""

from __future__ import annotations

import json

import pytest

from tests.integration.runs_support import (
    kill_paused_worker,
    pause,
    qd,
    run_id_of,
    status,
    tree_digest,
    wait_driver_done,
    wait_paused,
    write_recipe,
)


@pytest.mark.slow
@pytest.mark.parametrize("stage, fmt, src_dtype", [("dequant", "bf16", "fp8"), ("cast-fp8", "fp8-block", "bf16")])
def test_kill_conversion_stage_then_resume(tmp_path, tiny_ckpt, stage, fmt, src_dtype, monkeypatch):
    src = tiny_ckpt("deepseek-v3", src_dtype)
    work, out = tmp_path / "work", tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, out, fmt=fmt, shard_mb=0.05)
    r = qd("run", str(recipe), "--detach", **pause(stage, 12))
    rid = run_id_of(r)
    wait_paused(work, rid, stage)
    man = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
    assert 0 < len(man["shards"]) < len(man["planned_shards"])  # really mid-way: some shards done, some not
    killed_pid = kill_paused_worker(work, rid, stage)
    wait_driver_done(work, rid)
    st = status(work, rid, stage)
    assert st["state"] == "FAILED_WORKER" and st["error_class"] == "killed", st

    r = qd("resume", rid)
    assert r.returncode == 0 and "SUCCEEDED" in r.stderr, r.stderr

    from engine.convert import convert_checkpoint

    ref = tmp_path / "ref"
    monkeypatch.delenv("QUANTDECK_FSYNC", raising=False)  # as a run writes on its own machine (engine.runs.durability)
    convert_checkpoint(src, ref, to=fmt, device="cpu", shard_size=int(0.05 * 10**6))
    assert tree_digest(out) == tree_digest(ref)
    atts = [(a["attempt"], a["state"], a["error_class"], a["pid"])
            for a in json.loads(qd("history", rid, "--json").stdout) if a["stage"] == stage]
    assert atts[0] == (1, "FAILED_WORKER", "killed", killed_pid) and atts[1][:3] == (2, "SUCCEEDED", None)
