"""`quantdeck validate`'s label check: what config.json (and hf_quant_config.json for modelopt) say the checkpoint
is agrees with its tensors — a loader trusts the label, so an NVFP4 checkpoint labelled FP8, a modelopt one
without hf_quant_config.json, or a W4A4 algorithm on weights without input scales does not load as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.fsutil import read_json

WEIGHT_ONLY, W4A4 = "W4A16_NVFP4", "NVFP4"  # modelopt's quant_algo names
CT_FORMAT = "nvfp4-pack-quantized"


def _read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        obj = read_json(path)
    except (OSError, ValueError) as e:
        return None, f"{path.name} cannot be read: {e}"
    return (obj, None) if isinstance(obj, dict) else (None, f"{path.name} is not a JSON object")


def label_problems(directory: Path, config: dict[str, Any], names: set[str], nv: list[str],
                   fp8: list[str]) -> list[tuple[str, str]]:
    """(message, at) for each disagreement between the labels and the tensors (nv / fp8: module bases)."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    out: list[tuple[str, str]] = []
    cfg = str(directory / "config.json")
    if not nv and not fp8:
        if qc:
            out.append((f"config.json's quantization_config says {method!r}, but no tensor is quantized", cfg))
        return out
    if fp8 and not nv:
        if method != "fp8" or qc.get("weight_block_size") is None:
            out.append((f"{len(fp8)} FP8-block module(s), but config.json's quant_method is {method!r} (want 'fp8' "
                        "with weight_block_size)", cfg))
        return out
    w4a4 = any(b + ".input_scale" in names or b + ".input_global_scale" in names for b in nv)
    if any(b + ".weight_packed" in names for b in nv):  # compressed-tensors
        fmt = qc.get("format") or next((g.get("format") for g in (qc.get("config_groups") or {}).values()
                                         if isinstance(g, dict) and g.get("format")), None)
        if method != "compressed-tensors" or fmt != CT_FORMAT:
            out.append((f"{len(nv)} NVFP4 module(s) in compressed-tensors names, but config.json says quant_method "
                        f"{method!r}, format {fmt!r} (want 'compressed-tensors', {CT_FORMAT!r})", cfg))
        return out
    want = W4A4 if w4a4 else WEIGHT_ONLY
    if method != "modelopt" or qc.get("quant_algo") != want:
        out.append((f"{len(nv)} NVFP4 module(s) {'with' if w4a4 else 'without'} input scales, but config.json says "
                    f"quant_method {method!r}, quant_algo {qc.get('quant_algo')!r} (want 'modelopt', {want!r})", cfg))
    hq_path = directory / "hf_quant_config.json"
    if not hq_path.exists():
        out.append(("hf_quant_config.json is missing (modelopt's layout has it; loaders read it)", str(hq_path)))
        return out
    hq, err = _read(hq_path)
    if err:
        out.append((err, str(hq_path)))
    elif (hq.get("quantization") or {}).get("quant_algo") != want:
        out.append((f"hf_quant_config.json says quant_algo {(hq.get('quantization') or {}).get('quant_algo')!r} "
                    f"(want {want!r})", str(hq_path)))
    return out
