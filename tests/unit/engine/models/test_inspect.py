"""engine.models.inspect and `quantdeck inspect`: header-only report of tiny real fixtures and of broken copies."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from console.cli import main as cli_main
from engine.checkpoint import CheckpointReader
from engine.models import detect_layout
from engine.models.inspect import inspect_checkpoint, kept_itemsize, render_text
from tests.fixtures_ckpt import copy_ckpt


def _rewrite_shard(path, shard_of: str, edit) -> str:
    """Rewrite the shard holding tensor `shard_of` after `edit(dict)`; returns the shard name."""
    r = CheckpointReader(path)
    shard = r.meta(shard_of).shard
    tensors = {n: r.get(n) for n in r.names_in(shard)}
    r.close()
    edit(tensors)
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    return shard


def _edit_json(p, fn):
    obj = json.loads(p.read_text())
    fn(obj)
    p.write_text(json.dumps(obj))


@pytest.mark.parametrize("family", ["deepseek-v3", "deepseek-v4"])
@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_fixtures_inspect_cleanly(tiny_ckpt, family, dtype):
    rep = inspect_checkpoint(tiny_ckpt(family, dtype, mtp=True))
    assert rep.anomalies == [] and rep.ok
    assert rep.family == family and rep.config_layers == 2 and rep.config_experts == 4
    c = rep.counts
    # 4 routed experts × 3 in the MoE layer(s), shared experts, dense MLP (V3 layer 0); attention and MTP excluded
    assert c["quantize"] == (4 * 3 + 3 + 3 if family == "deepseek-v3" else 2 * (4 * 3 + 3))
    assert c["fused_groups"] == (4 + 1 + 1 if family == "deepseek-v3" else 2 * (4 + 1))
    assert c["quantize_attention_gemms"] == 10 and c["mtp_layers"] == 1 and c["mtp"] > 0
    assert c["unrecognized"] == 0
    if dtype == "fp8":
        assert rep.fp8_block == [128, 128]
        if family == "deepseek-v4":
            assert rep.block_formats["mxfp4 1x32 (scale F8_E8M0)"] == 3 * 4 * 3  # 2 layers + MTP
            assert "fp8 128x128 (scale F8_E8M0)" in rep.block_formats
        else:
            assert set(rep.block_formats) == {"fp8 128x128 (scale F32)"}
    else:
        assert rep.fp8_block is None and rep.block_formats == {}
    pats = {p.pattern: p for p in rep.patterns}
    key = ("model.layers.{L}.mlp.experts.{E}.up_proj.weight" if family == "deepseek-v3"
           else "layers.{L}.ffn.experts.{E}.w3.weight")
    assert pats[key].count == (4 if family == "deepseek-v3" else 8) and pats[key].role == "quantize"
    assert sum(p.count for p in rep.patterns) == rep.tensors
    assert sum(rep.bytes_by_dtype.values()) == rep.total_bytes
    text = render_text(rep)
    assert key in text and "anomalies    none" in text


def test_size_estimates_follow_the_formats(tiny_ckpt):
    path = tiny_ckpt("deepseek-v3", "bf16", hidden=320, moe_inter=96)
    rep = inspect_checkpoint(path)
    r = CheckpointReader(path)
    lay = detect_layout(r.config, r.names())
    nv = fp8 = 0
    for n in r.names():
        m = r.meta(n)
        if lay.should_quantize(n):
            o, i = m.shape
            nv += o * i // 2 + o * math.ceil(i / 16) + 4  # E2M1 codes, e4m3 block scales, fp32 scale_2
        else:
            nv += m.nbytes
        if lay.classify(n).gemm:
            o, i = m.shape
            fp8 += o * i + 4 * math.ceil(o / 128) * math.ceil(i / 128)
        else:
            fp8 += m.nbytes
    assert rep.estimates == {"nvfp4": nv, "fp8-block": fp8}
    assert rep.estimates["nvfp4"] < rep.estimates["fp8-block"] < rep.total_bytes


def test_kept_itemsize_follows_torch_dtypes():
    """The estimate's per-dtype table (no torch in the inspect stage) gives what torch's dtypes say."""
    from engine.checkpoint.safetensors_format import DTYPES, ITEMSIZE

    assert set(DTYPES) == set(ITEMSIZE)
    for name, dt in DTYPES.items():
        plain = dt in (torch.float32, torch.float64) or not dt.is_floating_point and dt not in (torch.int8, torch.uint8)
        assert kept_itemsize(name) == (dt.itemsize if plain else 2), name


def test_anomalies_name_the_file_and_tensor(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("deepseek-v3", "fp8"), tmp_path)
    w = "model.layers.1.mlp.experts.2.up_proj.weight"
    shard = _rewrite_shard(path, w, lambda t: t.pop(w + "_scale_inv"))
    _edit_json(path / "model.safetensors.index.json", lambda o: o["weight_map"].pop(w + "_scale_inv"))
    bad = "model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"
    shard2 = _rewrite_shard(path, bad, lambda t: t.__setitem__(bad, torch.ones(3, 3)))
    unlisted = "model.layers.0.self_attn.o_proj.weight"
    _edit_json(path / "model.safetensors.index.json", lambda o: o["weight_map"].pop(unlisted))
    _edit_json(path / "config.json", lambda o: o.update(num_hidden_layers=3, n_routed_experts=5))
    rep = inspect_checkpoint(path)
    got = {(a.what, a.at) for a in rep.anomalies}
    assert ("scale-missing", f"{shard}:{w}") in got
    assert ("scale-shape", f"{shard2}:{bad}") in got
    assert any(what == "index" and at.endswith(f"{unlisted}") for what, at in got)
    assert ("config", "config.json:num_hidden_layers") in got
    assert ("config", "layer 1 experts") in got
    assert not rep.ok
    msgs = " | ".join(a.msg for a in rep.anomalies)
    assert "missing layers 2" in msgs and "missing experts 4" in msgs
    # --json gives the same as one object; --strict turns errors into exit code 4
    assert cli_main(["inspect", str(path)]) == 0
    assert cli_main(["inspect", "--strict", str(path)]) == 4


def test_missing_shard_is_an_anomaly_not_a_crash(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt("deepseek-v4", "fp8"), tmp_path)
    full = inspect_checkpoint(path).tensors
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    rep = inspect_checkpoint(path)
    assert any(a.what == "index" and a.at == str(victim) and "shard missing" in a.msg for a in rep.anomalies)
    assert 0 < rep.tensors < full and not rep.ok


def test_generic_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(64, 32, generator=g).bfloat16(),
         "lm_head.weight": torch.randn(64, 32, generator=g).bfloat16(),
         "model.norm.weight": torch.ones(32).bfloat16()}
    for i in range(2):
        p = f"model.layers.{i}."
        for n, s in (("self_attn.q_proj", (32, 32)), ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (64, 32)),
                     ("mlp.up_proj", (64, 32)), ("mlp.down_proj", (32, 64))):
            t[p + n + ".weight"] = torch.randn(*s, generator=g).bfloat16()
        t[p + "input_layernorm.weight"] = torch.ones(32).bfloat16()
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    rep = inspect_checkpoint(tmp_path)
    assert rep.family == "generic" and rep.anomalies == []
    assert rep.counts["quantize"] == 6 and rep.counts["quantize_attention_gemms"] == 4
    assert rep.counts["fused_groups"] == 2


def test_cli_json_is_one_object_with_the_report(tiny_ckpt, capsys):
    path = tiny_ckpt("deepseek-v4", "fp8", mtp=True)
    assert cli_main(["inspect", "--json", str(path)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj == json.loads(json.dumps(inspect_checkpoint(path).to_json()))
    assert obj["family"] == "deepseek-v4" and obj["ok"] is True and obj["fp8_block"] == [128, 128]
    assert {"patterns", "counts", "bytes_by_dtype", "estimates", "anomalies", "block_formats"} <= set(obj)


@pytest.mark.parametrize("family", ["deepseek-v3", "deepseek-v4"])
def test_nvfp4_outputs_inspect_cleanly_and_match_the_estimate(tiny_ckpt, tmp_path, family):
    src = tiny_ckpt(family, "fp8", mtp=True)
    dst = tmp_path / "out"
    assert cli_main(["convert", "--src", str(src), "--dst", str(dst), "--to", "nvfp4", "--format", "both",
                     "--device", "cpu"]) == 0
    estimate = inspect_checkpoint(src).estimates["nvfp4"]
    for layout in ("modelopt", "compressed-tensors"):
        rep = inspect_checkpoint(dst / layout)
        assert rep.anomalies == [] and rep.family == family
        assert rep.block_formats == {"nvfp4 1x16 (scale F8_E4M3)": rep.counts["quantize"]}
        assert rep.total_bytes == estimate
