"""Any other transformer: every 2-D `.weight` of a Linear is a GEMM weight to quantize.

Preserved: embeddings, lm_head / head, norms, router gates (`mlp.gate`, `router`), 1-D tensors, biases.
Fused groups: gate_proj/up_proj and w1/w3 siblings; q/k/v_proj when attention is quantized.
The source-scale suffix is chosen by `detect_layout` from the names it sees (`weight_scale_inv` or `.scale`).
"""

from __future__ import annotations

import re
from typing import Sequence

from engine.core.names import Family
from engine.models.base import Kind, ModelLayout, Role, TensorInfo, expert_index, layer_index, quant_companion_base

_NORM = re.compile(r"(norm|ln_?\d*|layernorm|rmsnorm)(\.|_)weight$|(^|\.)ln_\w+\.weight$")
_EMBED = re.compile(r"(embed|embedding|wte|wpe|tok_embeddings)\w*\.weight$")
_HEAD = re.compile(r"(^|\.)(lm_head|head|output)\.weight$")
_ROUTER = re.compile(r"(\.gate|router|\.gating)(\.\w+)?\.weight$")
_ATTN = re.compile(r"(^|\.)(self_attn|attn|attention|self_attention)\.")
_FUSE = {"gate_proj": "gate_up", "up_proj": "gate_up", "w1": "w13", "w3": "w13"}
_QKV = ("q_proj", "k_proj", "v_proj")


@ModelLayout.register(Family.GENERIC)
class GenericLayout(ModelLayout):
    family = Family.GENERIC

    def __init__(self, config: dict | None = None, scale_suffix: str = ".weight_scale_inv"):
        super().__init__(config)
        self.scale_suffix = scale_suffix  # type: ignore[misc]  # per instance: detected from the names

    def classify(self, name: str, shape: Sequence[int] | None = None, *,
                 quantize_attention: bool = False) -> TensorInfo:
        if name.endswith(".scale") and self.scale_suffix != ".scale":
            return self._classify(name, shape, quantize_attention)  # a parameter that happens to be called scale
        return super().classify(name, shape, quantize_attention=quantize_attention)

    def weight_of_scale(self, name: str) -> str | None:
        base = quant_companion_base(name)
        return base if base is not None and name.endswith(self.scale_suffix) else None

    def _classify(self, name: str, shape: Sequence[int] | None, quantize_attention: bool) -> TensorInfo:
        layer, expert = layer_index(name), expert_index(name)
        n_layers = self.num_hidden_layers
        mtp = (layer is not None and n_layers is not None and layer >= n_layers
               or name.startswith(("mtp.", "model.mtp.")))
        attention = bool(_ATTN.search(name))
        kind, gemm = Kind.OTHER, False
        if _NORM.search(name) or name.endswith("norm.weight"):
            kind = Kind.NORM
        elif _EMBED.search(name):
            kind = Kind.EMBEDDING
        elif _HEAD.search(name):
            kind = Kind.HEAD
        elif _ROUTER.search(name):
            kind = Kind.ROUTER
        elif name.endswith(".weight") and (shape is None or len(shape) == 2):
            gemm = True
            kind = Kind.ATTENTION if attention else Kind.ROUTED_EXPERT if expert is not None else Kind.DENSE_MLP
            if ".shared_expert" in name:
                kind = Kind.SHARED_EXPERT
        proj = name.rsplit(".", 2)[-2] if name.count(".") >= 1 and gemm else None
        group = None
        if gemm and proj in _FUSE:
            group = name[: -len(f"{proj}.weight")] + _FUSE[proj]
        elif gemm and quantize_attention and attention and proj in _QKV:
            group = name[: -len(f"{proj}.weight")] + "qkv"
        role = Role.MTP if mtp else Role.QUANTIZE if gemm else Role.PRESERVE
        return TensorInfo(name, role, kind, layer=layer, expert=expert, attention=attention, mtp=mtp, gemm=gemm,
                          fused_group=group, proj=proj)
