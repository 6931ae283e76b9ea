"""Quantization configs by name: any modelopt preset (`NVFP4_DEFAULT_CFG`, ...) or quantdeck's own presets.

`deepseek-experts` follows modelopt's DeepSeek example (examples/deepseek/ptq.py without --mla_quant):
NVFP4 on the MLPs (routed experts, shared experts, dense MLPs) and nothing in attention or the head.
"""

from __future__ import annotations

import copy
from typing import Any

from engine.errors import RecipeError

PRESETS = ("deepseek-experts",)


def resolve_quant_cfg(name: str | dict) -> dict[str, Any]:
    """A fresh (deep-copied) modelopt quantize config for `name`."""
    if isinstance(name, dict):
        return copy.deepcopy(name)
    import modelopt.torch.quantization as mtq

    key = str(name)
    if key == "deepseek-experts":
        cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
        qc = cfg["quant_cfg"]
        extra = [{"quantizer_name": "*self_attn*", "enable": False},
                 {"quantizer_name": "*head*", "enable": False}]
        if isinstance(qc, list):
            qc.extend(extra)
        else:
            qc.update({e["quantizer_name"]: {"enable": False} for e in extra})
        return cfg
    cfg = getattr(mtq, key, None)
    if not isinstance(cfg, dict) or "quant_cfg" not in cfg:
        known = sorted(n for n in getattr(mtq.config, "choices", set())) + list(PRESETS)
        raise RecipeError(f"unknown quantization config {key!r}", at="quant_cfg",
                          hint=f"use one of: {', '.join(known)}")
    return copy.deepcopy(cfg)
