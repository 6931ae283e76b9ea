"""Preflight: cheap checks, one line per failure with its fix, on real tiny checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.core.errors import RecipeError
from engine.runs.preflight import Facts, estimate_output_bytes, run_preflight
from tests.fixtures_ckpt import copy_ckpt


def _recipe(tmp_path, src, extra="", device="cpu"):
    p = tmp_path / "recipe.toml"
    p.write_text(f'[run]\nworkdir = "{tmp_path / "work"}"\ndevice = "{device}"\n[source]\npath = "{src}"\n'
                 f'[target]\noutput = "{tmp_path / "out"}"\n{extra}')
    return p


def test_ready_recipe_passes_with_notes(tmp_path, tiny_ckpt):
    notes: list[str] = []
    assert run_preflight(_recipe(tmp_path, tiny_ckpt("deepseek-v3", "fp8")), notes=notes) == []
    assert any(n.startswith("torch ") for n in notes)


def test_each_failure_is_one_line_with_a_fix(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    samples = tmp_path / "s.json"
    samples.write_text('["ok", 3]')
    fails = run_preflight(_recipe(tmp_path, src, device="cuda", extra=(
        'calibrate = true\n[model]\nfamily = "deepseek-v4"\n'
        f'[calibration]\nsamples = "{samples}"\nnum_samples = 2\n')))
    text = "\n".join(fails)
    assert all("(fix: " in f and "\n" not in f for f in fails), fails
    assert "model.family is deepseek-v4 but the checkpoint looks like deepseek-v3" in text
    assert "samples:" in text and "s.json" in text
    import torch

    if not torch.cuda.is_available():
        assert 'device = "cuda" but no GPU is visible' in text


def test_broken_checkpoint_is_named(tmp_path, tiny_ckpt):
    src = copy_ckpt(tiny_ckpt("deepseek-v3", "bf16"), tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    fails = run_preflight(_recipe(tmp_path, src))
    assert len(fails) == 1 and "shard missing" in fails[0] and shard.name in fails[0], fails


def test_config_and_tensors_disagree(tmp_path, tiny_ckpt):
    src = copy_ckpt(tiny_ckpt("deepseek-v3", "bf16"), tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    fails = run_preflight(_recipe(tmp_path, src))
    assert any("num_hidden_layers=3" in f for f in fails), fails


def test_estimate_and_disk_margin(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    from engine.checkpoint.reader import CheckpointReader
    from engine.models.detect import detect_layout
    from engine.runs.recipe import load_recipe

    r = CheckpointReader(src)
    size = {}
    for fmt in ("nvfp4", "fp8-block", "bf16"):
        rec = load_recipe(_recipe(tmp_path, src, extra=f'format = "{fmt}"'))
        f = Facts(recipe=rec, paths={}, reader=r, layout=detect_layout(r.config, r.names()))
        size[fmt] = estimate_output_bytes(f)
    total = sum(r.meta(n).nbytes for n in r.names())
    assert size["nvfp4"] < size["fp8-block"] < size["bf16"] <= total
    p = _recipe(tmp_path, src)
    p.write_text(p.read_text().replace("[run]\n", "[run]\ndisk_margin = 10.0\n"))
    assert run_preflight(p) == []  # plenty of room here even with a 1000% margin


def test_push_target_unreachable(tmp_path, tiny_ckpt):
    fails = run_preflight(_recipe(tmp_path, tiny_ckpt("deepseek-v3", "bf16"), extra=(
        '[push]\ntarget = "s3://bucket/x"\nendpoint_url = "http://127.0.0.1:9"\n')))
    assert len(fails) == 1 and fails[0].startswith("push target s3://bucket/x") and "(fix: " in fails[0], fails


def test_bad_recipe_raises(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[source]\npath = "x"\n[target]\nformat = 1\n')
    with pytest.raises(RecipeError, match="r.toml: target.format"):
        run_preflight(p)


def test_existing_output_is_refused(tmp_path, tiny_ckpt):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    fails = run_preflight(_recipe(tmp_path, tiny_ckpt("deepseek-v3", "bf16")))
    assert len(fails) == 1 and fails[0].startswith(f"output {tmp_path / 'out'} already exists"), fails


def test_a_python_that_compiles_torch_at_every_start_gets_a_note(tmp_path):
    """Where torch's bytecode is not where this Python looks for it (here: an empty PYTHONPYCACHEPREFIX), preflight
    says so and how to fix it; where it is (the installed environment), nothing."""
    import importlib.util
    import subprocess
    import sys

    code = "from engine.runs.preflight import bytecode_note; print(bytecode_note())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    cached = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    origin = importlib.util.find_spec("torch").origin
    beside = Path(origin).parent / "__pycache__" / Path(importlib.util.cache_from_source(origin)).name
    assert (cached.stdout.strip() == "None") == beside.exists()  # pip compiles it beside the sources
    bare = subprocess.run([sys.executable, "-c", code], env=dict(env, PYTHONPYCACHEPREFIX=str(tmp_path / "pyc")),
                          capture_output=True, text=True, check=True)
    note = bare.stdout.strip()
    assert str(tmp_path / "pyc") in note and "PYTHONPYCACHEPREFIX" in note and "compileall" in note
