"""Model layouts: roles, kinds, fused groups, MTP, scale companions, detection and config checks."""

from __future__ import annotations

import pytest

from engine.core.errors import RegistryError
from engine.core.names import Family
from engine.models import (
    DeepseekV3Layout,
    DeepseekV4Layout,
    GenericLayout,
    Kind,
    ModelLayout,
    Role,
    collapse_indices,
    config_mismatches,
    detect_layout,
)

V3_CFG = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "n_routed_experts": 2, "first_k_dense_replace": 1,
          "num_nextn_predict_layers": 1}
V4_CFG = {"model_type": "deepseek_v4", "num_hidden_layers": 2, "n_routed_experts": 2, "num_nextn_predict_layers": 1}


def v3_names(mtp: bool = True, fp8: bool = True) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    layers = [0, 1, 2] if mtp else [0, 1]
    for i in layers:
        p = f"model.layers.{i}."
        attn = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
        gemms = [p + f"self_attn.{x}.weight" for x in attn]
        names += [p + "self_attn.q_a_layernorm.weight", p + "self_attn.kv_a_layernorm.weight",
                  p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if i == 0:
            gemms += [p + f"mlp.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")]
        else:
            names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
            gemms += [p + f"mlp.experts.{e}.{x}.weight" for e in (0, 1) for x in ("gate_proj", "up_proj", "down_proj")]
            gemms += [p + f"mlp.shared_experts.{x}.weight" for x in ("gate_proj", "up_proj", "down_proj")]
        names += gemms
        if fp8:
            names += [g.replace(".weight", ".weight_scale_inv") for g in gemms]
    if mtp:
        p = "model.layers.2."
        names += [p + x for x in ("embed_tokens.weight", "enorm.weight", "hnorm.weight", "eh_proj.weight",
                                  "shared_head.norm.weight", "shared_head.head.weight")]
    return sorted(names)


def v4_names(prefix: str = "") -> list[str]:
    names = [prefix + x for x in ("embed.weight", "head.weight", "norm.weight",
                                  "hc_head_fn", "hc_head_base", "hc_head_scale")]
    for blk in ("layers.0.", "layers.1.", "mtp.0."):
        p = prefix + blk
        attn = [p + f"attn.{x}.weight" for x in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")]
        ffn = [p + f"ffn.experts.{e}.{w}.weight" for e in (0, 1) for w in ("w1", "w2", "w3")]
        ffn += [p + f"ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        names += attn + ffn + [x.replace(".weight", ".scale") for x in attn + ffn]
        names += [p + x for x in ("attn.attn_sink", "attn.norm.weight", "attn.q_norm.weight", "attn_norm.weight",
                                  "ffn_norm.weight", "ffn.gate.weight", "ffn.gate.bias", "hc_attn_fn", "hc_attn_base",
                                  "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
                                  "attn.compressor.wkv.weight", "attn.compressor.ape", "attn.compressor.norm.weight",
                                  "attn.indexer.wq_b.weight", "attn.indexer.wq_b.scale",
                                  "attn.indexer.weights_proj.weight")]
    names += [prefix + "layers.0.ffn.gate.tid2eid"]
    names += [prefix + "mtp.0." + x
              for x in ("e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight")]
    return sorted(names)


def test_registry_has_the_three_families_and_lists_them_on_unknown():
    assert ModelLayout.names() == ["deepseek-v3", "deepseek-v4", "generic"]
    with pytest.raises(RegistryError, match="deepseek-v3, deepseek-v4, generic"):
        ModelLayout.get("llama")


def test_v3_roles_kinds_and_groups():
    lay = DeepseekV3Layout(V3_CFG)
    c = lay.classify
    e = c("model.layers.1.mlp.experts.1.up_proj.weight")
    assert (e.role, e.kind, e.layer, e.expert, e.gemm) == (Role.QUANTIZE, Kind.ROUTED_EXPERT, 1, 1, True)
    assert e.fused_group == c("model.layers.1.mlp.experts.1.gate_proj.weight").fused_group
    assert e.fused_group != c("model.layers.1.mlp.experts.0.gate_proj.weight").fused_group
    assert c("model.layers.1.mlp.experts.1.down_proj.weight").fused_group is None
    shared_up = c("model.layers.1.mlp.shared_experts.up_proj.weight")
    assert shared_up.fused_group == "model.layers.1.mlp.shared_experts.gate_up"
    assert c("model.layers.0.mlp.gate_proj.weight").fused_group == "model.layers.0.mlp.gate_up"
    assert c("model.layers.0.mlp.gate_proj.weight").kind is Kind.DENSE_MLP
    for n in ("model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert (c(n).role, c(n).kind) == (Role.PRESERVE, Kind.ROUTER)
    for n, k in (("model.embed_tokens.weight", Kind.EMBEDDING), ("lm_head.weight", Kind.HEAD),
                 ("model.layers.0.self_attn.kv_a_layernorm.weight", Kind.NORM)):
        assert (c(n).role, c(n).kind) == (Role.PRESERVE, k)
    a = c("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert a.attention and a.gemm and a.fused_group is None
    qa = lay.classify("model.layers.0.self_attn.q_a_proj.weight", quantize_attention=True)
    kva = lay.classify("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", quantize_attention=True)
    assert qa.fused_group == kva.fused_group == "model.layers.0.self_attn.q_a+kv_a"
    assert lay.classify("model.layers.0.self_attn.q_b_proj.weight", quantize_attention=True).fused_group is None
    idx = lay.classify("model.layers.1.self_attn.indexer.wq_b.weight")  # V3.2
    assert (idx.role, idx.kind, idx.gemm) == (Role.PRESERVE, Kind.INDEXER, False)


def test_v3_scale_companions_and_mtp():
    lay = DeepseekV3Layout(V3_CFG)
    w = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert lay.scale_name(w) == "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"
    s = lay.classify(lay.scale_name(w))
    assert (s.role, s.kind, s.weight, s.layer, s.expert) == (Role.SCALE, Kind.SCALE, w, 1, 0)
    assert lay.weight_of_scale(lay.scale_name(w)) == w
    assert lay.weight_of_scale(w) is None
    for n in v3_names():
        if n.startswith("model.layers.2."):
            info = lay.classify(n)
            assert info.mtp and info.layer == 2 and (info.role in (Role.MTP, Role.SCALE)), n
    assert lay.classify("model.layers.2.eh_proj.weight").kind is Kind.MTP_PROJ
    assert lay.classify("model.layers.2.shared_head.head.weight").kind is Kind.HEAD
    assert lay.classify("model.layers.2.mlp.experts.1.up_proj.weight").gemm
    assert not lay.should_quantize("model.layers.2.mlp.experts.1.up_proj.weight")
    assert lay.should_quantize("model.layers.2.mlp.experts.1.up_proj.weight", include_mtp=True)
    assert not lay.should_quantize("model.layers.0.self_attn.o_proj.weight")
    assert lay.should_quantize("model.layers.0.self_attn.o_proj.weight", quantize_attention=True)
    assert not lay.should_quantize("model.layers.1.mlp.gate.weight", quantize_attention=True, include_mtp=True)
    want = "model.layers.{L}.mlp.experts.{E}.up_proj.weight"
    assert lay.pattern("model.layers.1.mlp.experts.1.up_proj.weight") == want
    assert lay.pattern("model.layers.2.enorm.weight") == "model.layers.{MTP}.enorm.weight"


@pytest.mark.parametrize("prefix", ["", "model."])
def test_v4_native_names_with_or_without_prefix(prefix):
    lay = DeepseekV4Layout(V4_CFG)
    c = lay.classify
    w1 = c(prefix + "layers.0.ffn.experts.1.w1.weight")
    assert (w1.role, w1.kind, w1.layer, w1.expert) == (Role.QUANTIZE, Kind.ROUTED_EXPERT, 0, 1)
    w3 = c(prefix + "layers.0.ffn.experts.1.w3.weight")
    assert w1.fused_group == w3.fused_group == prefix + "layers.0.ffn.experts.1.w13"
    assert c(prefix + "layers.0.ffn.shared_experts.w3.weight").fused_group == prefix + "layers.0.ffn.shared_experts.w13"
    sc = c(prefix + "layers.0.ffn.experts.1.w1.scale")
    assert (sc.role, sc.weight) == (Role.SCALE, prefix + "layers.0.ffn.experts.1.w1.weight")
    assert lay.scale_name(prefix + "layers.0.attn.wq_a.weight") == prefix + "layers.0.attn.wq_a.scale"
    kinds = {
        "embed.weight": Kind.EMBEDDING, "head.weight": Kind.HEAD, "hc_head_fn": Kind.HC, "norm.weight": Kind.NORM,
        "layers.1.hc_attn_scale": Kind.HC, "layers.1.attn.compressor.wkv.weight": Kind.COMPRESSOR,
        "layers.1.attn.indexer.wq_b.weight": Kind.INDEXER, "layers.1.attn.attn_sink": Kind.ATTN_SINK,
        "layers.0.ffn.gate.tid2eid": Kind.TID2EID, "layers.1.ffn.gate.bias": Kind.ROUTER,
        "layers.1.ffn.gate.weight": Kind.ROUTER, "layers.1.attn.q_norm.weight": Kind.NORM,
    }
    for n, k in kinds.items():
        info = c(prefix + n)
        assert (info.role, info.kind, info.gemm) == (Role.PRESERVE, k, False), n
    wq = c(prefix + "layers.1.attn.wq_a.weight", quantize_attention=True)
    wkv = c(prefix + "layers.1.attn.wkv.weight", quantize_attention=True)
    assert wq.attention and wq.fused_group == wkv.fused_group
    m = c(prefix + "mtp.0.ffn.experts.0.w2.weight")
    assert (m.role, m.mtp, m.layer, m.gemm) == (Role.MTP, True, 2, True)
    assert (c(prefix + "mtp.0.e_proj.weight").kind, c(prefix + "mtp.0.norm.weight").kind) == (Kind.MTP_PROJ, Kind.NORM)
    assert c(prefix + "mtp.0.attn.wq_a.scale").role is Role.SCALE and c(prefix + "mtp.0.attn.wq_a.scale").mtp
    assert lay.pattern(prefix + "mtp.0.ffn.experts.3.w1.weight") == prefix + "mtp.{MTP}.ffn.experts.{E}.w1.weight"
    assert not any(c(n).kind is Kind.OTHER for n in v4_names(prefix))


def test_detect_layout_by_config_and_by_names():
    assert isinstance(detect_layout(V3_CFG, v3_names()), DeepseekV3Layout)
    assert isinstance(detect_layout(V4_CFG, v4_names()), DeepseekV4Layout)
    assert isinstance(detect_layout({}, v4_names("model.")), DeepseekV4Layout)  # no config: names decide
    assert isinstance(detect_layout({"model_type": "deepseek_v3"}, v4_names()), DeepseekV4Layout)  # names win
    assert isinstance(detect_layout({}, v3_names()), DeepseekV3Layout)
    assert detect_layout({}, v3_names()).classify("model.layers.2.mlp.experts.0.up_proj.weight").mtp  # via eh_proj
    g = detect_layout({"model_type": "llama", "num_hidden_layers": 1},
                      ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"])
    assert isinstance(g, GenericLayout) and g.family is Family.GENERIC


def test_generic_layout():
    g = GenericLayout({"num_hidden_layers": 2})
    c = g.classify
    up = c("model.layers.1.mlp.up_proj.weight", (64, 32))
    assert (up.role, up.gemm, up.layer, up.fused_group) == (Role.QUANTIZE, True, 1, "model.layers.1.mlp.gate_up")
    assert c("model.layers.1.mlp.gate_proj.weight").fused_group == up.fused_group
    assert c("model.layers.0.mlp.experts.3.w3.weight").fused_group == "model.layers.0.mlp.experts.3.w13"
    assert c("model.layers.0.mlp.experts.3.w3.weight").expert == 3
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
              "model.layers.0.mlp.gate.weight", "model.norm.weight"):
        assert c(n).role is Role.PRESERVE, n
    assert c("model.layers.0.self_attn.q_proj.bias", (64,)).role is Role.PRESERVE
    assert c("model.layers.0.conv.weight", (4, 4, 3)).role is Role.PRESERVE  # not 2-D: not a Linear
    q = c("model.layers.0.self_attn.q_proj.weight", quantize_attention=True)
    assert q.attention and q.fused_group == "model.layers.0.self_attn.qkv"
    assert c("model.layers.0.mlp.up_proj.weight_scale_inv").role is Role.SCALE
    assert c("model.layers.0.norm.scale").role is Role.PRESERVE  # `.scale` only a companion when detected
    gd = detect_layout({}, ["a.layers.0.fc.weight", "a.layers.0.fc.scale"])
    assert gd.scale_name("a.layers.0.fc.weight") == "a.layers.0.fc.scale"
    assert gd.classify("a.layers.0.fc.scale").role is Role.SCALE


def test_config_mismatches_name_layers_and_experts():
    lay = DeepseekV3Layout(V3_CFG)
    assert config_mismatches(lay, v3_names()) == []
    names = [n for n in v3_names() if ".experts.1." not in n]
    mm = config_mismatches(lay, names)
    assert len(mm) == 2 and "layer 1 has 1 experts (missing experts 1)" in mm[0].msg
    lay5 = DeepseekV3Layout({**V3_CFG, "num_hidden_layers": 5})
    mm = config_mismatches(lay5, v3_names(mtp=False))
    assert mm and mm[0].at == "config.json:num_hidden_layers" and "missing layers 2-4" in mm[0].msg


def test_collapse_indices():
    assert collapse_indices("layers.12.ffn.experts.255.w1.weight") == "layers.{L}.ffn.experts.{E}.w1.weight"
    assert collapse_indices("lm_head.weight") == "lm_head.weight"
