"""DeepSeek V3 / R1 in the Hugging Face layout (`model.layers.N.self_attn.q_a_proj.weight`, ...).

FP8 sources carry a float32 `X.weight_scale_inv` (128×128 blocks) next to every FP8 GEMM weight.
V3.2's `self_attn.indexer.*` is preserved. MTP layer k lives at `model.layers.{num_hidden_layers + k}`: a full
decoder block plus `embed_tokens`, `enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and `shared_head.head`.
"""

from __future__ import annotations

import re
from typing import Sequence

from engine.core.names import Family
from engine.models.base import Kind, ModelLayout, Role, TensorInfo

ATTN_GEMMS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP_GEMMS = ("gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED = re.compile(r"^mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")
_DENSE = re.compile(r"^mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_ATTN = re.compile(r"^self_attn\.(\w+)\.weight$")
_MTP_EXTRA = {
    "embed_tokens.weight": Kind.EMBEDDING,
    "enorm.weight": Kind.NORM,
    "hnorm.weight": Kind.NORM,
    "eh_proj.weight": Kind.MTP_PROJ,
    "shared_head.norm.weight": Kind.NORM,
    "shared_head.head.weight": Kind.HEAD,
}


@ModelLayout.register(Family.DEEPSEEK_V3)
class DeepseekV3Layout(ModelLayout):
    family = Family.DEEPSEEK_V3
    scale_suffix = ".weight_scale_inv"

    def _classify(self, name: str, shape: Sequence[int] | None, quantize_attention: bool) -> TensorInfo:
        top = {"model.embed_tokens.weight": Kind.EMBEDDING, "lm_head.weight": Kind.HEAD, "model.norm.weight": Kind.NORM}
        if name in top:
            return TensorInfo(name, Role.PRESERVE, top[name])
        m = _LAYER.match(name)
        if not m:
            return TensorInfo(name, Role.PRESERVE, Kind.OTHER)
        layer, rest = int(m.group(1)), m.group(2)
        n_layers = self.num_hidden_layers
        mtp = n_layers is not None and layer >= n_layers
        info = _classify_block(name, layer, rest, quantize_attention)
        if mtp:
            if rest in _MTP_EXTRA:
                info = TensorInfo(name, Role.PRESERVE, _MTP_EXTRA[rest], layer=layer)
            return TensorInfo(name, Role.MTP, info.kind, layer=layer, expert=info.expert, attention=info.attention,
                              mtp=True, gemm=info.gemm, fused_group=info.fused_group, proj=info.proj)
        return info


def _classify_block(name: str, layer: int, rest: str, quantize_attention: bool) -> TensorInfo:
    """One tensor of a decoder block; `rest` is the name after `model.layers.N.`."""
    prefix = name[: len(name) - len(rest)]
    if m := _EXPERT.match(rest):
        e, proj = int(m.group(1)), m.group(2)
        group = f"{prefix}mlp.experts.{e}.gate_up" if proj != "down_proj" else None
        return TensorInfo(name, Role.QUANTIZE, Kind.ROUTED_EXPERT, layer=layer, expert=e, gemm=True,
                          fused_group=group, proj=proj)
    if m := _SHARED.match(rest):
        proj = m.group(1)
        group = f"{prefix}mlp.shared_experts.gate_up" if proj != "down_proj" else None
        return TensorInfo(name, Role.QUANTIZE, Kind.SHARED_EXPERT, layer=layer, gemm=True, fused_group=group, proj=proj)
    if m := _DENSE.match(rest):
        proj = m.group(1)
        group = f"{prefix}mlp.gate_up" if proj != "down_proj" else None
        return TensorInfo(name, Role.QUANTIZE, Kind.DENSE_MLP, layer=layer, gemm=True, fused_group=group, proj=proj)
    if rest in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        return TensorInfo(name, Role.PRESERVE, Kind.ROUTER, layer=layer)
    if rest.startswith("self_attn.indexer."):  # V3.2 sparse-attention indexer: preserved
        return TensorInfo(name, Role.PRESERVE, Kind.INDEXER, layer=layer, attention=True)
    if (m := _ATTN.match(rest)) and m.group(1) in ATTN_GEMMS:
        proj = m.group(1)
        group = None
        if quantize_attention and proj in ("q_a_proj", "kv_a_proj_with_mqa"):
            group = f"{prefix}self_attn.q_a+kv_a"
        return TensorInfo(name, Role.QUANTIZE, Kind.ATTENTION, layer=layer, attention=True, gemm=True,
                          fused_group=group, proj=proj)
    if rest.endswith("layernorm.weight") or rest.endswith("norm.weight"):
        return TensorInfo(name, Role.PRESERVE, Kind.NORM, layer=layer, attention=rest.startswith("self_attn."))
    return TensorInfo(name, Role.PRESERVE, Kind.OTHER, layer=layer)
