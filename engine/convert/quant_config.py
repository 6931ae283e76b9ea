"""The quantization metadata an output checkpoint carries: config.json's `quantization_config` and, for
modelopt, `hf_quant_config.json`. The source's own `quantization_config` (DeepSeek FP8) is always removed
first; the ignore / exclude lists name exactly the GEMM modules that were kept unquantized.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from typing import Any

from engine import __version__
from engine.convert.plan import TO_BF16, TO_FP8, TO_NVFP4, ConvertPlan, natural_key
from engine.core.names import OutputLayout

PRODUCER = {"name": "quantdeck", "version": __version__}
QUANT_ALGO = "W4A16_NVFP4"  # what modelopt's export writes for weight-only NVFP4


def _nvfp4_weights_args() -> dict[str, Any]:
    return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": None}


_MTP_OR_LAYER = re.compile(r"^((?:model\.)?(?:layers|mtp)\.\d+)\.")
_ATTN_PARENT = re.compile(r"^(.*?\.(?:self_attn|attn))\.")


def exclude_patterns(plan: ConvertPlan) -> list[str]:
    """modelopt-style exclude list: `P.self_attn*` for a wholly kept attention block, `P.*` for a wholly
    kept MTP layer, exact module names otherwise; a pattern is used only if it matches nothing quantized."""
    quantized = plan.quantized_modules
    mtp = set(plan.mtp_modules)
    out: set[str] = set()
    for mod in plan.kept_modules:
        pattern = None
        m = _MTP_OR_LAYER.match(mod)
        if mod in mtp and m:
            pattern = m.group(1) + ".*"
        elif (a := _ATTN_PARENT.match(mod)) is not None:
            pattern = a.group(1) + "*"
        if pattern and not any(fnmatch.fnmatchcase(q, pattern) for q in quantized):
            out.add(pattern)
        else:
            out.add(mod)
    return sorted(out, key=natural_key)


def modelopt_hf_quant_config(plan: ConvertPlan) -> dict[str, Any]:
    """hf_quant_config.json as modelopt's export writes it for weight-only NVFP4 (W4A16_NVFP4)."""
    return {"producer": {"name": "modelopt", "version": _modelopt_version()},
            "quantization": {"quant_algo": QUANT_ALGO, "kv_cache_quant_algo": None, "group_size": 16,
                             "exclude_modules": exclude_patterns(plan)}}


def modelopt_quantization_config(plan: ConvertPlan) -> dict[str, Any]:
    """config.json's quantization_config, shaped as modelopt's export writes it."""
    return {"config_groups": {"group_0": {"weights": {"dynamic": False, "num_bits": 4, "type": "float",
                                                      "group_size": 16}, "targets": ["Linear"]}},
            "ignore": exclude_patterns(plan), "quant_algo": QUANT_ALGO,
            "producer": {"name": "modelopt", "version": _modelopt_version()}, "quant_method": "modelopt",
            "written_by": dict(PRODUCER)}


def _modelopt_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:  # noqa: BLE001
        return "unknown"


def compressed_tensors_quantization_config(plan: ConvertPlan) -> dict[str, Any]:
    """Weight-only NVFP4 (W4A16) in compressed-tensors' `nvfp4-pack-quantized` format."""
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed", "global_compression_ratio": None, "kv_cache_scheme": None,
            "sparsity_config": {}, "transform_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": _nvfp4_weights_args(),
                                          "input_activations": None, "output_activations": None,
                                          "format": "nvfp4-pack-quantized"}},
            "ignore": list(plan.kept_modules), "producer": dict(PRODUCER)}


def deepseek_fp8_quantization_config(family: str) -> dict[str, Any]:
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if family == "deepseek-v4":
        qc.update(scale_fmt="ue8m0", expert_dtype="fp8")  # every routed expert is FP8 block-128 now
    return qc


def output_config(src_config: dict[str, Any], plan: ConvertPlan, layout: str) -> dict[str, Any]:
    """config.json for the output: the source's, without its quantization_config, plus ours."""
    cfg = copy.deepcopy(src_config)
    cfg.pop("quantization_config", None)
    cfg.pop("compression_config", None)
    cfg.pop("expert_dtype", None)  # V4 ships its experts' encoding at the top too; transformers moves it in
    if plan.target == TO_NVFP4 and plan.quantized_modules:
        cfg["quantization_config"] = (modelopt_quantization_config(plan) if layout == str(OutputLayout.MODELOPT)
                                      else compressed_tensors_quantization_config(plan))
    elif plan.target == TO_FP8 and plan.quantized_modules:
        cfg["quantization_config"] = deepseek_fp8_quantization_config(plan.family)
    elif plan.target == TO_BF16:
        cfg["torch_dtype"] = "bfloat16"
        if "dtype" in cfg:
            cfg["dtype"] = "bfloat16"
    return cfg
