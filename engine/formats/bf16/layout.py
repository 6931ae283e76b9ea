"""BF16 layout: every GEMM weight as plain bfloat16 `M.weight` (the exact dequantization, rounded once to bf16).

No quantization_config: the source's FP8 one is removed (`ConfigPieces(None)`), and config.json's dtype says
bfloat16.
"""

from __future__ import annotations

from typing import Any

from engine.core.errors import FormatError
from engine.core.names import TargetFormat
from engine.formats.layout import ConfigPieces, Layout, Modules, TensorSpec, check_weight_shape

__all__ = ["Bf16Layout"]


@Layout.register(name=TargetFormat.BF16)
class Bf16Layout(Layout):
    target = TargetFormat.BF16.value
    quantized = False

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec("weight", "BF16", check_weight_shape(weight_shape, "bf16"))}

    @classmethod
    def pack(cls, state: dict, device: str = "cpu") -> dict:
        import torch

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
    def config(cls, modules: Modules | None = None, w4a4: bool = False) -> ConfigPieces:
        return ConfigPieces(quantization_config=None)

    @classmethod
    def output_config(cls, src_config: dict[str, Any], pieces: ConfigPieces) -> dict[str, Any]:
        cfg = super().output_config(src_config, pieces)
        cfg["torch_dtype"] = "bfloat16"
        if "dtype" in cfg:
            cfg["dtype"] = "bfloat16"
        return cfg
