"""ModelOpt's NVFP4 checkpoint layout (what `modelopt.torch.export.export_hf_checkpoint` writes).

Per quantized Linear `M`:
  * `M.weight`         uint8 [o, ceil(i/16)·8]  E2M1 codes, element 0 in the low nibble
  * `M.weight_scale`   float8_e4m3fn [o, ceil(i/16)]
  * `M.weight_scale_2` float32 0-d   (amax/(6·448), shared by a fused group)
  * `M.input_scale`    float32 0-d   only when calibrated (W4A4)
Value = e2m1(code) × fp32(weight_scale) × weight_scale_2.

Config: `hf_quant_config.json` = {"producer": {"name": "modelopt", "version"}, "quantization": {"quant_algo",
"kv_cache_quant_algo": null, "group_size": 16, "exclude_modules"}} and config.json `quantization_config` =
modelopt's own `convert_hf_quant_config_format` of it (`quant_method: modelopt`, config_groups, ignore).
quant_algo is "NVFP4" for W4A4 and, as modelopt labels weight-only NVFP4 exports, "W4A16_NVFP4" for
weight-only (vLLM's ModelOpt loader knows "NVFP4"; pass `quant_algo="NVFP4"` to force that label).
The producer name stays "modelopt" because loaders use it to recognize the file.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from engine.formats.layout import ConfigPieces, Layout, TensorSpec, check_weight_shape
from engine.formats.nvfp4.pack import nvfp4_specs, nvfp4_tensors, passthrough
from engine.core.names import OutputLayout, TargetFormat

GROUP_SIZE = 16

__all__ = ["ModeloptNvfp4Layout", "modelopt_version"]


def modelopt_version() -> str:
    try:
        return importlib.metadata.version("nvidia-modelopt")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - modelopt is a dependency
        return "0.47.0"


def _group(quant_algo: str) -> dict[str, Any]:
    """The config group modelopt's convert_hf_quant_config_format writes for these two algos."""
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
    group: dict[str, Any] = {}
    if quant_algo == "NVFP4":
        group["input_activations"] = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}
    group["weights"] = weights
    group["targets"] = ["Linear"]
    return group


@Layout.register(name=OutputLayout.MODELOPT)
class ModeloptNvfp4Layout(Layout):
    target = TargetFormat.NVFP4.value

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        shape = check_weight_shape(weight_shape, "modelopt")
        packed, bs = nvfp4_specs(shape)
        specs = {
            "weight": TensorSpec(torch.uint8, packed),
            "weight_scale": TensorSpec(torch.float8_e4m3fn, bs),
            "weight_scale_2": TensorSpec(torch.float32, ()),
        }
        if has_input_scale:
            specs["input_scale"] = TensorSpec(torch.float32, ())
        return specs

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
        t = nvfp4_tensors(state, device=device)
        out = passthrough(state)
        out["weight"] = t.packed
        out["weight_scale"] = t.block_scale
        out["weight_scale_2"] = t.scale_2.clone()
        if t.input_scale is not None:
            out["input_scale"] = t.input_scale.clone()
        return out

    @classmethod
    def hf_quant_config(cls, ignore=(), weight_only: bool = True, quant_algo: str | None = None) -> dict[str, Any]:
        algo = quant_algo or ("W4A16_NVFP4" if weight_only else "NVFP4")
        return {
            "producer": {"name": "modelopt", "version": modelopt_version()},
            "quantization": {
                "quant_algo": algo,
                "kv_cache_quant_algo": None,
                "group_size": GROUP_SIZE,
                "exclude_modules": sorted(set(ignore)),
            },
        }

    @classmethod
    def config(cls, ignore=(), weight_only: bool = True, quant_algo: str | None = None) -> ConfigPieces:
        hf = cls.hf_quant_config(ignore, weight_only, quant_algo)
        q = hf["quantization"]
        qc = {
            "config_groups": {"group_0": _group(q["quant_algo"])},
            "ignore": list(q["exclude_modules"]),
            "quant_algo": q["quant_algo"],
            "producer": dict(hf["producer"]),
            "quant_method": "modelopt",
        }
        return ConfigPieces(quantization_config=qc, files={"hf_quant_config.json": hf})
