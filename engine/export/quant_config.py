"""Quantization metadata of a calibrated W4A4 NVFP4 export (modelopt `NVFP4`, compressed-tensors W4A4).

Built on the weight-only configs (engine.convert.quant_config): same ignore / exclude lists,
with the activations described as modelopt's export and llm-compressor's NVFP4 scheme describe them.
"""

from __future__ import annotations

from typing import Any

QUANT_ALGO = "NVFP4"


def w4a4_hf_quant_config(plan) -> dict[str, Any]:
    from engine.convert.quant_config import modelopt_hf_quant_config

    cfg = modelopt_hf_quant_config(plan)
    cfg["quantization"]["quant_algo"] = QUANT_ALGO
    return cfg


def _input_args() -> dict[str, Any]:
    return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
            "dynamic": "local", "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None}


def w4a4_config(src_config: dict[str, Any], plan, layout: str) -> dict[str, Any]:
    """config.json for the output, with a W4A4 quantization_config for `layout`."""
    from engine.convert.quant_config import output_config

    cfg = output_config(src_config, plan, layout)
    qc = cfg.get("quantization_config")
    if not qc:
        return cfg
    if layout == "modelopt":
        qc["quant_algo"] = QUANT_ALGO
        for g in qc.get("config_groups", {}).values():
            g["input_activations"] = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    else:
        for g in qc.get("config_groups", {}).values():
            g["input_activations"] = _input_args()
    return cfg
