"""ModelOpt's NVFP4 checkpoint layout (what `modelopt.torch.export.export_hf_checkpoint` writes).

Per quantized Linear `M`:
  * `M.weight`         uint8 [o, ceil(i/16)·8]  E2M1 codes, element 0 in the low nibble
  * `M.weight_scale`   float8_e4m3fn [o, ceil(i/16)]
  * `M.weight_scale_2` float32 0-d   (amax/(6·448), shared by a fused group)
  * `M.input_scale`    float32 0-d   only when calibrated (W4A4)
Value = e2m1(code) × fp32(weight_scale) × weight_scale_2.

Config: `hf_quant_config.json` = {"producer": {"name": "modelopt", "version"}, "quantization": {"quant_algo",
"kv_cache_quant_algo": null, "group_size": 16, "exclude_modules"}} and config.json `quantization_config` =
modelopt's own `convert_hf_quant_config_format` of it (`quant_method: modelopt`, config_groups, ignore), plus
`written_by` (quantdeck). quant_algo is "NVFP4" for W4A4 and, as modelopt labels weight-only NVFP4 exports,
"W4A16_NVFP4" for weight-only. The producer name stays "modelopt" because loaders use it to recognize the file.
The exclude list is modelopt-style patterns (`exclude_patterns`).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

from engine.core.names import OutputLayout
from engine.formats.layout import PRODUCER, ConfigPieces, Layout, Modules, natural_key
from engine.formats.nvfp4.layout import CANONICAL, Nvfp4Layout

GROUP_SIZE = 16
WEIGHT_ONLY, W4A4 = "W4A16_NVFP4", "NVFP4"  # modelopt's quant_algo names

__all__ = ["ModeloptNvfp4Layout", "exclude_patterns", "modelopt_version"]

_MTP_OR_LAYER = re.compile(r"^((?:model\.)?(?:layers|mtp)\.\d+)\.")
_ATTN_PARENT = re.compile(r"^(.*?\.(?:self_attn|attn))\.")


def modelopt_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:  # noqa: BLE001
        return "unknown"


def exclude_patterns(modules: Modules) -> list[str]:
    """modelopt-style exclude list: `P.self_attn*` for a wholly kept attention block, `P.*` for a wholly
    kept MTP layer, exact module names otherwise; a pattern is used only if it matches nothing quantized."""
    mtp = set(modules.mtp)
    out: set[str] = set()
    for mod in modules.kept:
        pattern = None
        m = _MTP_OR_LAYER.match(mod)
        if mod in mtp and m:
            pattern = m.group(1) + ".*"
        elif (a := _ATTN_PARENT.match(mod)) is not None:
            pattern = a.group(1) + "*"
        if pattern and not any(fnmatch.fnmatchcase(q, pattern) for q in modules.quantized):
            out.add(pattern)
        else:
            out.add(mod)
    return sorted(out, key=natural_key)


def _fp4_args() -> dict[str, Any]:
    """One tensor's arguments in the config group modelopt's convert_hf_quant_config_format writes."""
    return {"dynamic": False, "num_bits": 4, "type": "float", "group_size": GROUP_SIZE}


@Layout.register(name=OutputLayout.MODELOPT)
class ModeloptNvfp4Layout(Nvfp4Layout):
    tensor_names = CANONICAL  # the converter's canonical NVFP4 tensors are this layout's
    scalar_shape = ()

    @classmethod
    def hf_quant_config(cls, modules: Modules, w4a4: bool = False) -> dict[str, Any]:
        """hf_quant_config.json as modelopt's export writes it."""
        return {
            "producer": {"name": "modelopt", "version": modelopt_version()},
            "quantization": {
                "quant_algo": W4A4 if w4a4 else WEIGHT_ONLY,
                "kv_cache_quant_algo": None,
                "group_size": GROUP_SIZE,
                "exclude_modules": exclude_patterns(modules),
            },
        }

    @classmethod
    def config(cls, modules: Modules, w4a4: bool = False) -> ConfigPieces:
        if not modules.quantized:
            return ConfigPieces(quantization_config=None)
        hf = cls.hf_quant_config(modules, w4a4)
        q = hf["quantization"]
        group: dict[str, Any] = {"weights": _fp4_args(), "targets": ["Linear"]}
        if w4a4:
            group["input_activations"] = _fp4_args()
        qc = {
            "config_groups": {"group_0": group},
            "ignore": list(q["exclude_modules"]),
            "quant_algo": q["quant_algo"],
            "producer": dict(hf["producer"]),
            "quant_method": "modelopt",
            "written_by": dict(PRODUCER),
        }
        return ConfigPieces(quantization_config=qc, files={"hf_quant_config.json": hf})

    @classmethod
    def label_problems(cls, directory, qc: dict[str, Any], n: int, w4a4: bool = False) -> list[tuple[str, str]]:
        """quant_method and quant_algo in config.json, and hf_quant_config.json's quant_algo (loaders read it)."""
        from engine.core.fsutil import read_json

        out: list[tuple[str, str]] = []
        method, want = qc.get("quant_method"), W4A4 if w4a4 else WEIGHT_ONLY
        if method != "modelopt" or qc.get("quant_algo") != want:
            out.append((f"{n} NVFP4 module(s) {'with' if w4a4 else 'without'} input scales, but config.json says "
                        f"quant_method {method!r}, quant_algo {qc.get('quant_algo')!r} (want 'modelopt', {want!r})",
                        str(Path(directory) / "config.json")))
        hq_path = Path(directory) / "hf_quant_config.json"
        if not hq_path.exists():
            return out + [("hf_quant_config.json is missing (modelopt's layout has it; loaders read it)", str(hq_path))]
        try:
            hq = read_json(hq_path)
        except (OSError, ValueError) as e:
            return out + [(f"{hq_path.name} cannot be read: {e}", str(hq_path))]
        if not isinstance(hq, dict):
            out.append((f"{hq_path.name} is not a JSON object", str(hq_path)))
        elif (hq.get("quantization") or {}).get("quant_algo") != want:
            out.append((f"hf_quant_config.json says quant_algo {(hq.get('quantization') or {}).get('quant_algo')!r} "
                        f"(want {want!r})", str(hq_path)))
        return out
