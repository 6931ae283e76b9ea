"""Turn a module's NVFP4 input state (float weight, or already-quantized codes) into neutral NVFP4 tensors.

Shared by the modelopt and compressed-tensors layouts; see engine/formats/layout.py for the input keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core.errors import FormatError
from engine.formats.e2m1 import E2M1_MAX
from engine.formats.nvfp4.dispatch import bf16_to_nvfp4
from engine.formats.nvfp4.helpers import E4M3_MAX, as_scale_2, global_scale, packed_cols, weight_amax

CONSUMED = ("weight", "nvfp4_packed", "nvfp4_block_scale", "weight_scale_2", "input_scale", "input_amax")

__all__ = ["CONSUMED", "Nvfp4Tensors", "input_scale_from_amax", "nvfp4_tensors", "nvfp4_specs"]


@dataclass(frozen=True)
class Nvfp4Tensors:
    packed: torch.Tensor  # uint8 [o, ceil(i/16)*8]
    block_scale: torch.Tensor  # float8_e4m3fn [o, ceil(i/16)]
    scale_2: torch.Tensor  # float32 0-d
    input_scale: torch.Tensor | None  # float32 0-d


def input_scale_from_amax(amax) -> torch.Tensor:
    """`input_scale = amax / (6·448)`; never zero, negative or non-finite (FormatError)."""
    a = torch.as_tensor(amax, dtype=torch.float32).detach().cpu().reshape(())
    s = a / (E2M1_MAX * E4M3_MAX)
    if not bool(torch.isfinite(s)) or float(s) <= 0:
        raise FormatError(
            f"input amax {float(a)} gives an unusable input_scale {float(s)}",
            at="input_amax",
            hint="an activation that was never seen needs its siblings' max (engine.export)",
        )
    return s


def _input_scale(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "input_scale" in state:
        s = torch.as_tensor(state["input_scale"], dtype=torch.float32).detach().cpu().reshape(())
        if not bool(torch.isfinite(s)) or float(s) <= 0:
            raise FormatError(f"input_scale {float(s)} must be finite and > 0", at="input_scale")
        return s
    if "input_amax" in state:
        return input_scale_from_amax(state["input_amax"])
    return None


def nvfp4_tensors(state: dict[str, torch.Tensor], device: str = "cpu") -> Nvfp4Tensors:
    """Quantize (or take) the module's weight as NVFP4."""
    if "nvfp4_packed" in state:
        if "weight_scale_2" not in state or "nvfp4_block_scale" not in state:
            raise FormatError(
                "pre-quantized NVFP4 state needs nvfp4_block_scale and weight_scale_2", at="nvfp4_packed"
            )
        packed, bs = state["nvfp4_packed"], state["nvfp4_block_scale"]
        if packed.dtype != torch.uint8 or bs.dtype != torch.float8_e4m3fn or bs.shape[-1] * 8 != packed.shape[-1]:
            raise FormatError(
                f"pre-quantized NVFP4 tensors have wrong dtypes/shapes: {packed.dtype} {tuple(packed.shape)}, "
                f"{bs.dtype} {tuple(bs.shape)}",
                at="nvfp4_packed",
            )
        s2 = as_scale_2(state["weight_scale_2"])
    elif "weight" in state:
        w = state["weight"]
        if w.dim() != 2 or not w.is_floating_point() or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise FormatError(
                f"NVFP4 layouts quantize a 2-D float weight, got {w.dtype} {tuple(w.shape)}",
                at="weight",
                hint="dequantize FP8 first, or pass nvfp4_packed/nvfp4_block_scale from the fused kernel",
            )
        s2 = as_scale_2(state["weight_scale_2"]) if "weight_scale_2" in state else global_scale(weight_amax(w))
        packed, bs = bf16_to_nvfp4(w, s2, device=device)
    else:
        raise FormatError("module state has neither weight nor nvfp4_packed", at="state")
    return Nvfp4Tensors(packed.cpu(), bs.cpu(), s2, _input_scale(state))


def passthrough(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a layout does not consume (bias, ...), unchanged."""
    return {k: v for k, v in state.items() if k not in CONSUMED}


def nvfp4_specs(weight_shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(packed shape, block-scale shape) for a weight shape."""
    o, i = weight_shape
    return (o, packed_cols(i)), (o, -(-i // 16))
