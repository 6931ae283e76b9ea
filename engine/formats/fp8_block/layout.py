"""DeepSeek's FP8 block-128 layout (V3/R1 Hugging Face naming), as DeepSeek's own cast script writes it from BF16
models.

Per quantized Linear `M`: `M.weight` float8_e4m3fn [o, i] and `M.weight_scale_inv` float32
[ceil(o/128), ceil(i/128)] (a multiplier: value = fp32(code) × scale). The `fp8-block-ue8m0` layout is
DeepSeek V4's: `M.scale` float8_e8m0fnu powers of two, and the config says `scale_fmt: ue8m0` and
`expert_dtype: fp8` (every routed expert FP8 block-128).
config.json `quantization_config` (only when a module is quantized): {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]} (DeepSeek's own); kept modules are not listed,
as DeepSeek's release relies on the absence of scales instead.
"""

from __future__ import annotations

from engine.core.errors import FormatError
from engine.core.names import TargetFormat
from engine.formats.grid import scale_grid
from engine.formats.layout import ConfigPieces, Layout, Modules, TensorSpec, check_weight_shape

BLOCK = (128, 128)

__all__ = ["Fp8BlockLayout", "Fp8BlockUe8m0Layout"]


@Layout.register(name=TargetFormat.FP8_BLOCK)
class Fp8BlockLayout(Layout):
    target = TargetFormat.FP8_BLOCK.value
    ue8m0 = False
    scale = ("weight_scale_inv", "F32")  # the block scale's local name and dtype

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        shape = check_weight_shape(weight_shape, cls.registered_name)
        name, dtype = cls.scale
        grid = scale_grid(shape, BLOCK)
        return {"weight": TensorSpec("weight", "F8_E4M3", shape), name: TensorSpec(name, dtype, grid)}

    @classmethod
    def pack(cls, state: dict, device: str = "cpu") -> dict:
        import torch

        from engine.formats.fp8_block.helpers import cast_fp8_block

        if "weight" not in state:
            raise FormatError("module state has no weight", at="state")
        sn = cls.scale[0]
        out = {k: v for k, v in state.items() if k not in ("weight", sn, "input_scale", "input_amax")}
        w = state["weight"]
        if w.dtype == torch.float8_e4m3fn:  # already DeepSeek FP8: keep codes and scales as they are
            if sn not in state:
                raise FormatError(f"FP8 weight without its {sn}", at=sn)
            out["weight"], out[sn] = w, state[sn]
            return out
        out["weight"], out[sn] = cast_fp8_block(w, BLOCK, ue8m0=cls.ue8m0)
        return out

    @classmethod
    def config(cls, modules: Modules, w4a4: bool = False) -> ConfigPieces:
        if not modules.quantized:
            return ConfigPieces(quantization_config=None)
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
        if cls.ue8m0:
            qc.update(scale_fmt="ue8m0", expert_dtype="fp8")  # every routed expert is FP8 block-128 now
        return ConfigPieces(quantization_config=qc)


@Layout.register(name="fp8-block-ue8m0")
class Fp8BlockUe8m0Layout(Fp8BlockLayout):
    """DeepSeek V4's: power-of-two float8_e8m0fnu scales named `scale` (`scale_fmt: ue8m0`)."""

    ue8m0 = True
    scale = ("scale", "F8_E8M0")
