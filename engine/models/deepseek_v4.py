"""DeepSeek V4 in DeepSeek's native naming (`layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.E.w1.weight`),
with or without a leading `model.`.

The public release ships attention GEMMs (wq_a, wq_b, wkv, wo_a, wo_b), the shared expert, the indexer's
wq_b and the MTP projections in FP8 with a UE8M0 `.scale` over 128×128 blocks, and routed experts in MXFP4
(packed [out, in/2] with a `.scale` per 32 inputs); the uniform-FP8 repackage has FP8 everywhere with
`.scale` companions. Preserved: norms, router gate (weight, bias, tid2eid), embeddings (`embed`), `head`,
`hc_*`, the compressor, the indexer and `attn_sink`. MTP layer k lives under `mtp.{k}.`.
"""

from __future__ import annotations

import re
from typing import Sequence

from engine.core.names import Family
from engine.models.base import Kind, ModelLayout, Role, TensorInfo

ATTN_GEMMS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")
_BLOCK = re.compile(r"^(model\.)?(layers|mtp)\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^ffn\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_SHARED = re.compile(r"^ffn\.shared_experts\.(w1|w2|w3)\.weight$")
_ATTN = re.compile(r"^attn\.(\w+)\.weight$")
_HC = re.compile(r"^hc_(attn|ffn|head)_(fn|base|scale)$")
_TOP = {
    "embed.weight": Kind.EMBEDDING,
    "embed_tokens.weight": Kind.EMBEDDING,
    "head.weight": Kind.HEAD,
    "lm_head.weight": Kind.HEAD,
    "norm.weight": Kind.NORM,
    "hc_head_fn": Kind.HC,
    "hc_head_base": Kind.HC,
    "hc_head_scale": Kind.HC,
    "hc_head.hc_fn": Kind.HC,
    "hc_head.hc_base": Kind.HC,
    "hc_head.hc_scale": Kind.HC,
}
_MTP_EXTRA = {
    "e_proj.weight": Kind.MTP_PROJ,
    "h_proj.weight": Kind.MTP_PROJ,
    "enorm.weight": Kind.NORM,
    "hnorm.weight": Kind.NORM,
    "norm.weight": Kind.NORM,
    "embed.weight": Kind.EMBEDDING,
    "head.weight": Kind.HEAD,
}


@ModelLayout.register(Family.DEEPSEEK_V4)
class DeepseekV4Layout(ModelLayout):
    family = Family.DEEPSEEK_V4
    scale_suffix = ".scale"

    def _classify(self, name: str, shape: Sequence[int] | None, quantize_attention: bool) -> TensorInfo:
        bare = name[len("model."):] if name.startswith("model.") else name
        if bare in _TOP:
            return TensorInfo(name, Role.PRESERVE, _TOP[bare])
        m = _BLOCK.match(name)
        if not m:
            return TensorInfo(name, Role.PRESERVE, Kind.OTHER)
        where, idx, rest = m.group(2), int(m.group(3)), m.group(4)
        prefix = name[: len(name) - len(rest)]
        if where == "layers":
            return _classify_block(name, prefix, idx, rest, quantize_attention)
        layer = (self.num_hidden_layers or 0) + idx
        if rest in _MTP_EXTRA:
            kind = _MTP_EXTRA[rest]
            return TensorInfo(name, Role.MTP, kind, layer=layer, mtp=True, gemm=kind is Kind.MTP_PROJ,
                              proj=rest.split(".")[0] if kind is Kind.MTP_PROJ else None)
        info = _classify_block(name, prefix, layer, rest, quantize_attention)
        return TensorInfo(name, Role.MTP, info.kind, layer=layer, expert=info.expert, attention=info.attention,
                          mtp=True, gemm=info.gemm, fused_group=info.fused_group, proj=info.proj)


def _classify_block(name: str, prefix: str, layer: int, rest: str, quantize_attention: bool) -> TensorInfo:
    if m := _EXPERT.match(rest):
        e, proj = int(m.group(1)), m.group(2)
        group = f"{prefix}ffn.experts.{e}.w13" if proj != "w2" else None
        return TensorInfo(name, Role.QUANTIZE, Kind.ROUTED_EXPERT, layer=layer, expert=e, gemm=True,
                          fused_group=group, proj=proj)
    if m := _SHARED.match(rest):
        proj = m.group(1)
        group = f"{prefix}ffn.shared_experts.w13" if proj != "w2" else None
        return TensorInfo(name, Role.QUANTIZE, Kind.SHARED_EXPERT, layer=layer, gemm=True, fused_group=group, proj=proj)
    if rest.startswith("ffn.gate."):
        kind = Kind.TID2EID if rest == "ffn.gate.tid2eid" else Kind.ROUTER
        return TensorInfo(name, Role.PRESERVE, kind, layer=layer)
    if rest.startswith("attn.compressor."):
        return TensorInfo(name, Role.PRESERVE, Kind.COMPRESSOR, layer=layer, attention=True)
    if rest.startswith("attn.indexer."):
        return TensorInfo(name, Role.PRESERVE, Kind.INDEXER, layer=layer, attention=True)
    if rest in ("attn.attn_sink", "attn.sinks"):
        return TensorInfo(name, Role.PRESERVE, Kind.ATTN_SINK, layer=layer, attention=True)
    if (m := _ATTN.match(rest)) and m.group(1) in ATTN_GEMMS:
        proj = m.group(1)
        group = f"{prefix}attn.wq_a+wkv" if quantize_attention and proj in ("wq_a", "wkv") else None
        return TensorInfo(name, Role.QUANTIZE, Kind.ATTENTION, layer=layer, attention=True, gemm=True,
                          fused_group=group, proj=proj)
    if _HC.match(rest):
        return TensorInfo(name, Role.PRESERVE, Kind.HC, layer=layer)
    if rest.endswith("norm.weight"):
        return TensorInfo(name, Role.PRESERVE, Kind.NORM, layer=layer, attention=rest.startswith("attn."))
    return TensorInfo(name, Role.PRESERVE, Kind.OTHER, layer=layer)
