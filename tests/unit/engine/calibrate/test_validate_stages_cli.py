"""validate_amax, the deepseek-experts preset, the calibrate/export stages and the CLI commands."""

import json

import pytest
import torch

from engine.calibrate import snapshot as snap
from engine.calibrate.validate import validate_amax
from engine.core.errors import ValidationFailedError
from engine.stages import load_all
from engine.stages.base import Stage, StageContext

load_all()


@pytest.fixture(scope="module")
def staged(v3_dir, samples_file, tmp_path_factory):
    d = tmp_path_factory.mktemp("stages")
    ctx = StageContext(run_dir=d, stage_dir=d / "stages" / "calibrate", params={
        "model": str(v3_dir), "samples": str(samples_file), "amax": str(d / "amax"), "seq_len": 24,
        "batch_size": 2, "quant_cfg": "deepseek-experts", "device": "cpu"})
    stage = Stage.get("calibrate")()
    assert stage.distributed
    summary = stage.run(ctx)
    return d, ctx, summary


def test_deepseek_experts_preset_calibrates_mlps_and_wo(staged, v3_dir):
    """modelopt's DeepSeek example: experts, shared experts, dense MLPs and attention wo (o_proj); no other
    attention quantizer, no head."""
    d, ctx, summary = staged
    amax = snap.load_amax(d / "amax")
    assert summary["finished"] and amax
    attn = {k for k in amax if ".self_attn." in k}
    assert attn == {f"model.layers.{i}.self_attn.o_proj.{q}_quantizer.amax" for i in range(3)
                    for q in ("weight", "input")}
    assert "model.layers.0.mlp.down_proj.input_quantizer.amax" in amax
    assert "model.layers.2.mlp.experts.gate_up_proj_weight_quantizers.0.amax" in amax
    assert "model.layers.1.mlp.shared_experts.up_proj.weight_quantizer.amax" in amax
    assert not [k for k in amax if "head" in k or ".mlp.gate." in k]
    assert Stage.get("calibrate")().check_saved(ctx) == []
    from calib_tiny_models import assert_amax_equal, reference_quantized_model

    from engine.calibrate.layer_pass import layer_amax
    from engine.calibrate.samples import load_samples

    ids = load_samples(ctx.params["samples"], tokenizer=v3_dir, seq_len=24).input_ids
    ref = layer_amax(reference_quantized_model(v3_dir, ids, batch_size=2, quant_cfg="deepseek-experts"))
    assert_amax_equal(ref, amax)


def test_export_stage_quantizes_exactly_the_presets_modules(staged, v3_dir):
    d, _, _ = staged
    ctx = StageContext(run_dir=d, stage_dir=d / "stages" / "export", params={
        "src": str(v3_dir), "amax": str(d / "amax"), "dst": str(d / "out"), "layouts": ["modelopt"],
        "device": "cpu"})
    res = Stage.get("export")().run(ctx)
    idx = json.loads((d / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    scaled = {k[: -len(".input_scale")] for k in idx if k.endswith(".input_scale")}
    assert "model.layers.1.mlp.experts.0.gate_proj" in scaled and "model.layers.0.mlp.down_proj" in scaled
    assert {k for k in scaled if ".self_attn." in k} == {f"model.layers.{i}.self_attn.o_proj" for i in range(3)}
    amax_mods = {k.rsplit(".", 2)[0] for k in snap.load_amax(d / "amax") if ".weight_quantizer." in k}
    assert {k for k in scaled if ".experts." not in k} == {m for m in amax_mods if ".experts." not in m}
    hq = json.loads((d / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert hq["quant_algo"] == "NVFP4"
    assert "model.layers.0.self_attn.q_a_proj" in hq["exclude_modules"] and "lm_head" in hq["exclude_modules"]
    assert not [p for p in hq["exclude_modules"] if "o_proj" in p or p.endswith("self_attn*")]
    assert res["quantized_modules"] == len(scaled)
    assert Stage.get("export")().check_saved(ctx) == []


def test_validate_amax_finds_missing_bad_and_short_snapshots(staged, v3_dir, tmp_path):
    d, _, _ = staged
    good = validate_amax(d / "amax", v3_dir)
    assert good["ok"] and good["quantizers"] > 0 and good["missing"] == [] and good["layers_done"] == 3
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(d / "amax", bad)
    tensors, cov = snap.read_layer(bad, 1)
    key = sorted(tensors)[0]
    tensors[key] = torch.tensor(0.0)
    del tensors[sorted(tensors)[-1]]
    snap.write_layer(bad, 1, tensors, cov)
    snap.layer_path(bad, 2).unlink()
    rep = validate_amax(bad, v3_dir)
    text = " | ".join(rep["problems"])
    assert not rep["ok"] and "2 of 3 layers" in text and "missing" in text and "zero, negative" in text
    with pytest.raises(ValidationFailedError):
        validate_amax(bad, v3_dir, strict=True)


def test_cli_calibrate_bad_samples_and_export(staged, v3_dir, tmp_path):
    from click.testing import CliRunner

    from console.cli import cli

    bad = tmp_path / "s.json"
    bad.write_text('["fine", ""]')
    from console.cli import main

    code = main(["calibrate", "--model", str(v3_dir), "--samples", str(bad), "--out", str(tmp_path / "a")])
    assert code == 3
    d, _, _ = staged
    r = CliRunner().invoke(cli, ["export", "--src", str(v3_dir), "--amax", str(d / "amax"), "--dst",
                                 str(tmp_path / "o"), "--format", "compressed-tensors", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output.strip().splitlines()[-1])
    assert rep["outputs"]["compressed-tensors"] == str(tmp_path / "o")


def test_cli_validate_with_amax_checks_the_snapshot(staged, v3_dir, tmp_path):
    """`quantdeck validate OUT --against SRC --amax AMAX`: the snapshot is checked against the source model."""
    import shutil

    from console.cli import main

    d, _, _ = staged
    out = tmp_path / "o"
    assert main(["export", "--src", str(v3_dir), "--amax", str(d / "amax"), "--dst", str(out), "--quiet"]) == 0
    assert main(["validate", str(out), "--against", str(v3_dir), "--amax", str(d / "amax"), "--json"]) == 0
    bad = tmp_path / "bad"
    shutil.copytree(d / "amax", bad)
    snap.layer_path(bad, 2).unlink()
    assert main(["validate", str(out), "--amax", str(bad), "--json"]) == 4


def test_cli_validate_a_snapshot_alone(staged, v3_dir, tmp_path, capsys):
    """`quantdeck validate --amax AMAX [--model CKPT]` (and a snapshot given as the directory) checks the snapshot
    alone: layers, quantizers the model expects, values; a short snapshot fails naming it; no argument is a usage
    error."""
    import shutil

    from console.cli import main

    d, _, _ = staged
    assert main(["validate", "--amax", str(d / "amax"), "--model", str(v3_dir), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["layers_done"] == rep["num_layers"] == 3 and rep["missing"] == [] and rep["quantizers"]
    assert main(["validate", str(d / "amax")]) == 0
    assert "3 of 3 calibrated" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(d / "amax", bad)
    snap.layer_path(bad, 1).unlink()
    assert main(["validate", "--amax", str(bad), "--model", str(v3_dir)]) == 4
    out = capsys.readouterr()
    assert "layer files are not contiguous" in out.out and str(bad) in out.err
    assert main(["validate"]) == 2
    assert "give a checkpoint DIRECTORY to validate, or --amax AMAX_DIR [--model CKPT]" in capsys.readouterr().err


def test_expected_quantizers_inserts_once_per_layer_structure_with_the_same_names(tiny_ckpt):
    """A named config is inserted once per layer structure (dense, MoE) and its names moved to each layer; a
    config given as a dict is inserted layer by layer: both give the same names."""
    from engine.calibrate.qconfig import resolve_quant_cfg
    from engine.calibrate.validate import expected_quantizers

    src = tiny_ckpt("deepseek-v3", "bf16", layers=4)
    named = expected_quantizers(src, "NVFP4_DEFAULT_CFG")
    assert named == expected_quantizers(src, resolve_quant_cfg("NVFP4_DEFAULT_CFG"))
    assert {n.split(".")[2] for n in named} == {"0", "1", "2", "3"}
    assert any(".mlp.experts." in n for n in named if n.startswith("model.layers.3."))
