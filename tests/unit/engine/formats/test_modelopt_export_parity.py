"""The modelopt layout writes what modelopt's own export_hf_checkpoint writes for weight-only NVFP4, byte for byte."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from engine.checkpoint.safetensors_format import dtype_name
from engine.formats import Layout, Modules
from engine.formats.nvfp4.helpers import global_scale, weight_amax

GROUPS = {  # fused groups share weight_scale_2 (the max), as modelopt's export does
    "self_attn": (("q_proj", "k_proj", "v_proj"), ("o_proj",)),
    "mlp": (("gate_proj", "up_proj"), ("down_proj",)),
}


@pytest.mark.slow
def test_modelopt_layout_equals_export_hf_checkpoint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
        from safetensors import safe_open
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"],
        )
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        source = {k: v.clone() for k, v in model.state_dict().items()}
        model = mtq.quantize(model, mtq.W4A16_NVFP4_CFG, lambda m: m(torch.randint(0, 128, (1, 8))))
        export_hf_checkpoint(model, export_dir=tmp_path)

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    layout = Layout.get("modelopt")
    checked = 0
    for block, groups in GROUPS.items():
        for group in groups:
            mods = [f"model.layers.0.{block}.{p}" for p in group]
            s2 = global_scale(weight_amax(*(source[f"{m}.weight"].float() for m in mods)))
            for m in mods:
                w = source[f"{m}.weight"]
                ours = layout.pack_module(m, {f"{m}.weight": w.float(), f"{m}.weight_scale_2": s2})
                specs = layout.module_specs(m, tuple(w.shape))
                theirs = {k: v for k, v in exported.items() if k.startswith(m + ".")}
                assert set(ours) == set(theirs) == set(specs)
                for k, t in theirs.items():
                    assert ours[k].dtype == t.dtype and dtype_name(t.dtype) == specs[k].dtype
                    assert tuple(ours[k].shape) == tuple(t.shape) == specs[k].shape
                    assert torch.equal(ours[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
                checked += 1
    assert checked == 7
    hf = json.loads((tmp_path / "hf_quant_config.json").read_text())
    quantized = tuple(f"model.layers.0.{b}.{p}" for b, groups in GROUPS.items() for g in groups for p in g)
    pieces = layout.config(Modules(kept=tuple(hf["quantization"]["exclude_modules"]), quantized=quantized))
    assert pieces.files["hf_quant_config.json"] == hf
    qc = dict(pieces.quantization_config)
    assert qc.pop("written_by")["name"] == "quantdeck"  # ours names its writer; the rest is modelopt's
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == qc
