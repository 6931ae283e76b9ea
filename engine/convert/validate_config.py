"""`quantdeck validate`'s label check: what config.json (and hf_quant_config.json for modelopt) say the checkpoint
is agrees with its tensors — a loader trusts the label, so an NVFP4 checkpoint labelled FP8, a modelopt one
without hf_quant_config.json, or a W4A4 algorithm on weights without input scales does not load as it is. What
an NVFP4 output's labels must say is its layout's to tell (`Layout.label_problems`, engine.formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core.names import OutputLayout
from engine.formats.layout import Layout
from engine.formats.nvfp4.names import find_nvfp4


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
    stored = [s for b in nv if (s := find_nvfp4(b, names)) is not None]  # the layout the tensors are stored in
    layout = Layout.get(stored[0].names.layout if stored else OutputLayout.MODELOPT)
    return out + layout.label_problems(directory, qc, len(nv), w4a4=any(s.input_scale for s in stored))
