"""compressed-tensors' NVFP4 layout (`format: nvfp4-pack-quantized`), as its NVFP4PackedCompressor reads it.

Per quantized Linear `M` (same bytes as the modelopt layout, other names, reciprocal global scales):
  * `M.weight_packed`       uint8 [o, ceil(i/16)·8]
  * `M.weight_scale`        float8_e4m3fn [o, ceil(i/16)]
  * `M.weight_global_scale` float32 [1] = 1 / weight_scale_2
  * `M.input_global_scale`  float32 [1] = 1 / input_scale, only when calibrated (W4A4)
config.json `quantization_config`: quant_method compressed-tensors, format nvfp4-pack-quantized,
quantization_status compressed, one config group targeting Linear with weights
{num_bits 4, type float, symmetric, group_size 16, strategy tensor_group, scale_dtype float8_e4m3fn};
input_activations null for weight-only (W4A16), or, for W4A4, what llm-compressor writes from
compressed-tensors' NVFP4 preset (dynamic "local", tensor_group 16, observer `INPUT_OBSERVER`); `ignore` lists
the modules kept unquantized, exactly; `producer` names quantdeck.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.names import OutputLayout
from engine.formats.layout import PRODUCER, ConfigPieces, Layout, Modules
from engine.formats.nvfp4.layout import Nvfp4Layout, Nvfp4Names

GROUP_SIZE = 16
FORMAT = "nvfp4-pack-quantized"
# compressed-tensors' NVFP4 preset sets this observer for its input activations (since 0.13, where the
# scale_dtype / zp_dtype arguments below appeared); tests pin it against the installed preset.
INPUT_OBSERVER = "static_minmax"

__all__ = ["FORMAT", "INPUT_OBSERVER", "CompressedTensorsNvfp4Layout"]


def _fp4_args(**extra: Any) -> dict[str, Any]:
    """One tensor's QuantizationArgs, every field written as compressed-tensors dumps them."""
    args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP_SIZE, "strategy": "tensor_group",
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None}
    args.update(extra)
    return args


@Layout.register(name=OutputLayout.COMPRESSED_TENSORS)
class CompressedTensorsNvfp4Layout(Nvfp4Layout):
    tensor_names = Nvfp4Names(str(OutputLayout.COMPRESSED_TENSORS), "weight_packed", "weight_scale",
                              "weight_global_scale", "input_global_scale", True)
    scalar_shape = (1,)

    @classmethod
    def config(cls, modules: Modules, w4a4: bool = False) -> ConfigPieces:
        if not modules.quantized:
            return ConfigPieces(quantization_config=None)
        inputs = _fp4_args(dynamic="local", observer=INPUT_OBSERVER) if w4a4 else None
        qc = {
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": _fp4_args(), "input_activations": inputs,
                                          "output_activations": None, "format": FORMAT}},
            "quant_method": "compressed-tensors",
            "kv_cache_scheme": None,
            "format": FORMAT,
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "sparsity_config": {},
            "transform_config": {},
            "ignore": list(modules.kept),
            "producer": dict(PRODUCER),
        }
        return ConfigPieces(quantization_config=qc)

    @classmethod
    def label_problems(cls, directory, qc: dict[str, Any], n: int, w4a4: bool = False) -> list[tuple[str, str]]:
        method = qc.get("quant_method")
        fmt = qc.get("format") or next((g.get("format") for g in (qc.get("config_groups") or {}).values()
                                         if isinstance(g, dict) and g.get("format")), None)
        if method != "compressed-tensors" or fmt != FORMAT:
            return [(f"{n} NVFP4 module(s) in compressed-tensors names, but config.json says quant_method "
                     f"{method!r}, format {fmt!r} (want 'compressed-tensors', {FORMAT!r})",
                     str(Path(directory) / "config.json"))]
        return []
