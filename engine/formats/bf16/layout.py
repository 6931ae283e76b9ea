"""BF16 layout: every GEMM weight as plain bfloat16 `M.weight` (the exact dequantization, rounded once to bf16).

No quantization_config: the source's FP8 one is removed (`ConfigPieces(None)`).
"""

from __future__ import annotations

import torch

from engine.core.errors import FormatError
from engine.formats.layout import ConfigPieces, Layout, TensorSpec, check_weight_shape
from engine.core.names import TargetFormat

__all__ = ["Bf16Layout"]


@Layout.register(name=TargetFormat.BF16)
class Bf16Layout(Layout):
    target = TargetFormat.BF16.value
    quantized = False

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec(torch.bfloat16, check_weight_shape(weight_shape, "bf16"))}

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
        w = state.get("weight")
        if w is None or not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise FormatError(
                "bf16 layout needs the dequantized float weight",
                at="weight",
                hint="dequantize FP8/MXFP4 first (engine.formats.fp8_block / mxfp4 helpers)",
            )
        out = {k: v for k, v in state.items() if k not in ("weight", "weight_scale_inv", "input_scale", "input_amax")}
        out["weight"] = w.to(torch.bfloat16)
        return out

    @classmethod
    def config(cls, ignore=(), weight_only: bool = True) -> ConfigPieces:
        return ConfigPieces(quantization_config=None)
