"""The modelopt layout of a BF16 tiny DeepSeek V3 equals what modelopt's own export_hf_checkpoint writes for the
same model with weights-only NVFP4 (attention disabled, as modelopt's DeepSeek recipe): same tensor names,
dtypes and shapes, equal bytes, same exclude list."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.checkpoint import CheckpointReader
from engine.convert import convert_checkpoint


@pytest.mark.slow
def test_matches_modelopt_export_hf_checkpoint(tmp_path):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=128, hidden_size=64, intermediate_size=48, moe_intermediate_size=32,
                           num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                           n_shared_experts=1, n_group=1, topk_group=1, num_attention_heads=4, num_key_value_heads=4,
                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                           max_position_embeddings=64, architectures=["DeepseekV3ForCausalLM"])
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(copy.deepcopy(cfg)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    torch.manual_seed(0)  # the same weights again (save_pretrained rewrites its config's dtype to a string)
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    qcfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    qcfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})  # weights only
    qcfg["quant_cfg"].append({"quantizer_name": "*self_attn*", "enable": False})  # DeepSeek recipe
    ids = torch.randint(0, 128, (1, 8))
    model = mtq.quantize(model, qcfg, forward_loop=lambda m: m(ids))
    export_hf_checkpoint(model, export_dir=str(tmp_path / "modelopt"))

    convert_checkpoint(tmp_path / "bf16", tmp_path / "ours", to="nvfp4", layouts=["modelopt"])
    ours, ref = CheckpointReader(tmp_path / "ours"), CheckpointReader(tmp_path / "modelopt")
    assert ours.names() == ref.names()
    assert sum(n.endswith(".weight_scale_2") for n in ref.names()) == 18
    for n in ref.names():
        a, b = ours.get(n), ref.get(n)
        assert (a.dtype, a.shape) == (b.dtype, b.shape), n
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), n
    ref_q = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    our_q = json.loads((tmp_path / "ours" / "hf_quant_config.json").read_text())["quantization"]
    assert our_q["exclude_modules"] == ref_q["exclude_modules"]
    assert our_q["quant_algo"] == ref_q["quant_algo"] and our_q["group_size"] == ref_q["group_size"]
