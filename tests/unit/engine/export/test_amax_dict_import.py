"""modelopt DeepSeek example's amax_dict_rank*-mp*.pt: ranks merged by max, native names mapped, siblings filled."""

import json

import pytest
import torch
from calib_tiny_models import build_v3
from safetensors import safe_open

from engine.calibrate.amax_dict import load_amax_dict, native_to_hf
from engine.calibrate.validate import validate_amax
from engine.core.errors import CheckpointError, UsageError
from engine.export.api import export_checkpoint


def test_native_names_map_to_transformers_names():
    assert native_to_hf("layers.3.ffn.experts.17.w1.input_quantizer._amax") == \
        "model.layers.3.mlp.experts.17.gate_proj.input_quantizer.amax"
    assert native_to_hf("layers.0.attn.wkv_a.weight_quantizer._amax") == \
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_quantizer.amax"
    assert native_to_hf("layers.2.ffn.shared_experts.w2.weight_quantizer._amax") == \
        "model.layers.2.mlp.shared_experts.down_proj.weight_quantizer.amax"


def _native(layer_amax: float, rank: int) -> dict:
    sd = {}
    for w in ("w1", "w2", "w3"):
        sd[f"layers.0.ffn.{w}.input_quantizer._amax"] = torch.tensor(1.0 + rank)
        sd[f"layers.0.ffn.{w}.weight_quantizer._amax"] = torch.tensor(0.1)
        for layer in (1, 2):
            sd[f"layers.{layer}.ffn.shared_experts.{w}.input_quantizer._amax"] = torch.tensor(2.0)
            sd[f"layers.{layer}.ffn.shared_experts.{w}.weight_quantizer._amax"] = torch.tensor(0.1)
            for e in range(rank * 4, rank * 4 + 4):  # expert parallel: each rank holds half the experts
                if not (layer == 1 and e == 5):
                    sd[f"layers.{layer}.ffn.experts.{e}.{w}.input_quantizer._amax"] = torch.tensor(layer_amax + e)
                else:
                    sd[f"layers.{layer}.ffn.experts.{e}.{w}.input_quantizer._amax"] = torch.tensor(0.0)
                sd[f"layers.{layer}.ffn.experts.{e}.{w}.weight_quantizer._amax"] = torch.tensor(0.1)
    sd["layers.1.attn.kv_bmm_quantizer._amax"] = torch.tensor(9.0)  # not a GEMM quantizer: export ignores it
    return sd


@pytest.fixture(scope="module")
def amax_dict_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("amaxdict")
    for r in range(2):
        torch.save(_native(3.0, r), d / f"amax_dict_rank{r}-mp2.pt")
    return d


def test_ranks_merge_by_max(amax_dict_dir):
    amax = load_amax_dict(sorted(amax_dict_dir.glob("*.pt")))
    assert float(amax["model.layers.0.mlp.gate_proj.input_quantizer.amax"]) == 2.0
    assert float(amax["model.layers.2.mlp.experts.7.down_proj.input_quantizer.amax"]) == 10.0


def test_export_from_amax_dict_fills_empty_experts_and_keeps_attention(amax_dict_dir, tmp_path):
    model = build_v3(tmp_path / "model", seed=3)
    rep = export_checkpoint(model, amax_dict_dir, tmp_path / "out", device="cpu")
    assert rep["amax"]["kind"] == "modelopt-amax-dict" and not rep["quantize_attention"]
    assert set(rep["filled_from_siblings"]) == {f"model.layers.1.mlp.experts.5.{p}" for p in
                                               ("gate_proj", "up_proj", "down_proj")}
    out = tmp_path / "out"
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.self_attn.q_a_proj.input_scale" not in idx
    with safe_open(str(out / idx["model.layers.1.mlp.experts.5.down_proj.input_scale"]), "pt") as fh:
        filled = float(fh.get_tensor("model.layers.1.mlp.experts.5.down_proj.input_scale"))
        sib = float(fh.get_tensor("model.layers.1.mlp.experts.7.down_proj.input_scale"))
        assert filled == sib == pytest.approx(10.0 / (6 * 448))
        bf = fh.get_tensor("model.layers.1.self_attn.q_a_proj.weight")
        assert bf.dtype == torch.bfloat16
    report = validate_amax(amax_dict_dir)
    assert report["kind"] == "modelopt-amax-dict" and not report["ok"]  # expert 5's zero amax is reported


def test_not_an_amax_dir(tmp_path):
    with pytest.raises(CheckpointError, match="neither layer_NNN"):
        export_checkpoint(build_v3(tmp_path / "m", seed=4, num_hidden_layers=1), tmp_path, tmp_path / "o")


def test_dst_inside_the_source_is_refused(tmp_path):
    model = build_v3(tmp_path / "m", seed=4, num_hidden_layers=1)
    with pytest.raises(UsageError, match="inside the source directory"):
        export_checkpoint(model, tmp_path / "amax", model / "out")
    assert not (model / "out").exists() and not (model / "out.partial").exists()
