"""A calibrated run: calibrate killed after its first layer and resumed from the next one, export killed
mid-way, then `quantdeck export-only` finishes export → inject-mtp → copy-extras → validate from the saved
amax snapshot, without calibrating again. Real processes; the kill points are the worker's test hook."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.runs_support import (
    kill_paused_worker,
    pause,
    qd,
    run_dir,
    run_id_of,
    status,
    tree_state,
    wait_driver_done,
    wait_paused,
    write_recipe,
)


@pytest.mark.slow
def test_export_only_after_a_failed_export(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps(["<|User|>hello there, tell me a story about a cat.", "what is 2+2? explain",
                                   "plain text sample number three", "the fourth sample, short",
                                   "a fifth sample, held out for eval"]))
    work, out = tmp_path / "work", tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, out, extra=(
        f'calibrate = true\n[calibration]\nsamples = "{samples}"\nnum_samples = 4\nseq_len = 32\n'
        '[eval]\nnum_samples = 1\nseq_len = 16\nmax_kld_mean = 10.0\nmin_top1 = 0.0\n'))
    r = qd("run", recipe, "--detach", **pause("calibrate", 1))
    assert r.returncode == 0, r.stderr
    rid = run_id_of(r)
    amax = run_dir(work, rid) / "amax"
    wait_paused(work, rid, "calibrate")
    deadline = time.monotonic() + 60  # one rank writes each layer file on its writer thread, after the progress
    while not list(amax.glob("layer_000*")) and time.monotonic() < deadline:  # event the pause hook parks on
        time.sleep(0.1)
    first_layer = {p.name: p.read_bytes() for p in amax.glob("layer_000*")}
    assert first_layer, sorted(p.name for p in amax.iterdir())
    kill_paused_worker(work, rid, "calibrate")
    wait_driver_done(work, rid)
    assert status(work, rid, "calibrate")["error_class"] == "killed"

    r = qd("resume", rid, "--detach", **pause("export", 30))
    assert r.returncode == 0, r.stderr
    wait_paused(work, rid, "export")
    kill_paused_worker(work, rid, "export")
    wait_driver_done(work, rid)
    assert status(work, rid, "export")["state"] == "FAILED_WORKER"
    assert status(work, rid, "calibrate")["state"] == "SUCCEEDED"
    assert {p.name: p.read_bytes() for p in amax.glob("layer_000*")} == first_layer  # layer 0 not redone
    snapshot = tree_state(amax)

    r = qd("export-only", rid)
    assert r.returncode == 0, r.stdout + r.stderr
    assert tree_state(amax) == snapshot  # exported from the saved snapshot, nothing recalibrated
    view = json.loads(qd("status", rid, "--json").stdout)
    assert view["result"] == "SUCCEEDED"
    atts = json.loads(qd("history", rid, "--json").stdout)
    by = {}
    for a in atts:
        by.setdefault(a["stage"], []).append((a["state"], a["error_class"]))
    assert by["calibrate"] == [("FAILED_WORKER", "killed"), ("SUCCEEDED", None)]
    assert by["export"] == [("FAILED_WORKER", "killed"), ("SUCCEEDED", None)]
    assert by["validate"] == [("SUCCEEDED", None)]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert "input_scale" in (out / "model.safetensors.index.json").read_text(), hq
    assert qd("validate-only", rid).returncode == 0
