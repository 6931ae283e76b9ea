"""DeepSeek's FP8 block-128 layout (V3/R1 Hugging Face naming), as DeepSeek's own cast script writes it from BF16 models.

Per quantized Linear `M`: `M.weight` float8_e4m3fn [o, i] and `M.weight_scale_inv` float32
[ceil(o/128), ceil(i/128)] (a multiplier: value = fp32(code) × scale). With `ue8m0=True` the scales are
float8_e8m0fnu powers of two and the config says `scale_fmt: ue8m0`, as V4 ships them.
config.json `quantization_config`: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]} (DeepSeek's own), plus `modules_to_not_convert` when modules are kept
(transformers' FineGrainedFP8Config reads it; DeepSeek's release relies on the absence of scales instead).
"""

from __future__ import annotations

import torch

from engine.core.errors import FormatError
from engine.formats.fp8_block.helpers import cast_fp8_block, scale_grid
from engine.formats.layout import ConfigPieces, Layout, TensorSpec, check_weight_shape
from engine.core.names import TargetFormat

BLOCK = (128, 128)

__all__ = ["Fp8BlockLayout", "Fp8BlockUe8m0Layout"]


@Layout.register(name=TargetFormat.FP8_BLOCK)
class Fp8BlockLayout(Layout):
    target = TargetFormat.FP8_BLOCK.value
    ue8m0 = False

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        shape = check_weight_shape(weight_shape, "fp8-block")
        sdt = torch.float8_e8m0fnu if cls.ue8m0 else torch.float32
        return {
            "weight": TensorSpec(torch.float8_e4m3fn, shape),
            "weight_scale_inv": TensorSpec(sdt, scale_grid(shape, BLOCK)),
        }

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
        if "weight" not in state:
            raise FormatError("module state has no weight", at="state")
        out = {k: v for k, v in state.items() if k not in ("weight", "weight_scale_inv", "input_scale", "input_amax")}
        w = state["weight"]
        if w.dtype == torch.float8_e4m3fn:  # already DeepSeek FP8: keep codes and scales as they are
            if "weight_scale_inv" not in state:
                raise FormatError("FP8 weight without its weight_scale_inv", at="weight_scale_inv")
            out["weight"], out["weight_scale_inv"] = w, state["weight_scale_inv"]
            return out
        out["weight"], out["weight_scale_inv"] = cast_fp8_block(w, BLOCK, ue8m0=cls.ue8m0)
        return out

    @classmethod
    def config(cls, ignore=(), weight_only: bool = True) -> ConfigPieces:
        qc = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": list(BLOCK),
        }
        if cls.ue8m0:
            qc["scale_fmt"] = "ue8m0"
        if ignore:
            qc["modules_to_not_convert"] = sorted(set(ignore))
        return ConfigPieces(quantization_config=qc)


@Layout.register(name="fp8-block-ue8m0")
class Fp8BlockUe8m0Layout(Fp8BlockLayout):
    """The same with power-of-two float8_e8m0fnu scales (`scale_fmt: ue8m0`, DeepSeek V4 style)."""

    ue8m0 = True
