"""compressed-tensors' NVFP4 layout (`format: nvfp4-pack-quantized`), as its NVFP4PackedCompressor reads it.

Per quantized Linear `M` (same bytes as the modelopt layout, other names, reciprocal global scales):
  * `M.weight_packed`       uint8 [o, ceil(i/16)·8]
  * `M.weight_scale`        float8_e4m3fn [o, ceil(i/16)]
  * `M.weight_global_scale` float32 [1] = 1 / weight_scale_2
  * `M.input_global_scale`  float32 [1] = 1 / input_scale, only when calibrated (W4A4)
config.json `quantization_config`: quant_method compressed-tensors, format nvfp4-pack-quantized,
quantization_status compressed, one config group targeting Linear with weights
{num_bits 4, type float, symmetric, group_size 16, strategy tensor_group, scale_dtype float8_e4m3fn};
input_activations null for weight-only (W4A16), or the NVFP4 preset's (dynamic "local", tensor_group 16) for
W4A4; `ignore` lists the modules kept unquantized.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.formats.layout import ConfigPieces, Layout, TensorSpec, check_weight_shape
from engine.formats.nvfp4.pack import nvfp4_specs, nvfp4_tensors, passthrough
from engine.core.names import OutputLayout, TargetFormat

GROUP_SIZE = 16

__all__ = ["CompressedTensorsNvfp4Layout"]


def _fp4_args(**extra: Any) -> dict[str, Any]:
    args = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": GROUP_SIZE,
        "strategy": "tensor_group",
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
    }
    args.update(extra)
    return args


@Layout.register(name=OutputLayout.COMPRESSED_TENSORS)
class CompressedTensorsNvfp4Layout(Layout):
    target = TargetFormat.NVFP4.value

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        shape = check_weight_shape(weight_shape, "compressed-tensors")
        packed, bs = nvfp4_specs(shape)
        specs = {
            "weight_packed": TensorSpec(torch.uint8, packed),
            "weight_scale": TensorSpec(torch.float8_e4m3fn, bs),
            "weight_global_scale": TensorSpec(torch.float32, (1,)),
        }
        if has_input_scale:
            specs["input_global_scale"] = TensorSpec(torch.float32, (1,))
        return specs

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
        t = nvfp4_tensors(state, device=device)
        out = passthrough(state)
        out["weight_packed"] = t.packed
        out["weight_scale"] = t.block_scale
        out["weight_global_scale"] = (1.0 / t.scale_2).reshape(1)
        if t.input_scale is not None:
            out["input_global_scale"] = (1.0 / t.input_scale).reshape(1)
        return out

    @classmethod
    def config(cls, ignore=(), weight_only: bool = True) -> ConfigPieces:
        inputs = None if weight_only else _fp4_args(dynamic="local", observer="static_minmax")
        qc = {
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": _fp4_args(),
                    "input_activations": inputs,
                    "output_activations": None,
                    "format": "nvfp4-pack-quantized",
                }
            },
            "quant_method": "compressed-tensors",
            "kv_cache_scheme": None,
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "ignore": sorted(set(ignore)),
        }
        return ConfigPieces(quantization_config=qc)
