"""Quantization configs by name: any modelopt preset (`NVFP4_DEFAULT_CFG`, ...) or quantdeck's own presets.

`deepseek-experts` is what modelopt's DeepSeek example (examples/deepseek/ptq.py, defaults: no
--mla_quant, no --disable_wo_quant) quantizes, in the transformers model's names: NVFP4 on the routed
experts, the shared experts, the dense MLPs and the attention output projection (`wo` = `self_attn.o_proj`);
the rest of attention (q/kv projections, the MLA bmm quantizers) and the head stay unquantized. The MoE
router is not a Linear and never quantized. MTP layers are not part of the calibrated model (modelopt's
example does not load them either; its export excludes `layers.<n>*`).
"""

from __future__ import annotations

import copy
from typing import Any

from engine.core.errors import RecipeError

PRESETS = ("deepseek-experts",)
# quantizers the preset enables in attention, with the format of the default weight / input quantizers
ATTN_KEPT_QUANTIZED = ("*self_attn.o_proj.weight_quantizer", "*self_attn.o_proj.input_quantizer")


def _deepseek_experts(mtq) -> dict[str, Any]:
    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    qc = cfg["quant_cfg"]
    if isinstance(qc, list):  # modelopt >= 0.45: ordered entries, the last match wins
        fmt = {e["quantizer_name"]: e.get("cfg") for e in qc if isinstance(e, dict) and "quantizer_name" in e}
        qc.extend([{"quantizer_name": "*self_attn*", "enable": False},
                   {"quantizer_name": "*head*", "enable": False}])
        for pat in ATTN_KEPT_QUANTIZED:
            kind = "*weight_quantizer" if pat.endswith("weight_quantizer") else "*input_quantizer"
            qc.append({"quantizer_name": pat, "cfg": copy.deepcopy(fmt[kind]), "enable": True})
    else:  # older dict form: insertion order, later keys win
        qc["*self_attn*"] = {"enable": False}
        qc["*head*"] = {"enable": False}
        for pat in ATTN_KEPT_QUANTIZED:
            kind = "*weight_quantizer" if pat.endswith("weight_quantizer") else "*input_quantizer"
            qc[pat] = dict(copy.deepcopy(qc[kind]), enable=True)
    return cfg


def resolve_quant_cfg(name: str | dict) -> dict[str, Any]:
    """A fresh (deep-copied) modelopt quantize config for `name`."""
    if isinstance(name, dict):
        return copy.deepcopy(name)
    from engine.calibrate.modelopt_import import quantization

    mtq = quantization()
    key = str(name)
    if key == "deepseek-experts":
        return _deepseek_experts(mtq)
    cfg = getattr(mtq, key, None)
    if not isinstance(cfg, dict) or "quant_cfg" not in cfg:
        known = sorted(n for n in getattr(mtq.config, "choices", set())) + list(PRESETS)
        raise RecipeError(f"unknown quantization config {key!r}", at="quant_cfg",
                          hint=f"use one of: {', '.join(known)}")
    return copy.deepcopy(cfg)
