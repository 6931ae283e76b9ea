"""An NVFP4 module read from a stored checkpoint, in either layout (engine.formats.nvfp4.names): its codes and block
scales as stored, its global and input scales as multipliers, and its decoded values.

`scale_2` of compressed-tensors' `weight_global_scale` g is fp32(1/g): the fp32 value whose reciprocal, as quantdeck
and compressed-tensors compute it, gives g back, so a module re-laid from one layout to the other and back holds the
same bytes. Where the fp32 reciprocal is not one-to-one (about one scale in six), fp32(1/g) may be one ulp from the
`weight_scale_2` that the same conversion writes in the modelopt layout: g alone does not say which it was.
Decoding is engine.formats.nvfp4.helpers.dequant_nvfp4 (modelopt's NVFP4QTensor.dequantize rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.core.errors import CORRUPT_SOURCE, FormatError
from engine.formats.nvfp4.helpers import dequant_nvfp4
from engine.formats.nvfp4.names import StoredNames

__all__ = ["StoredNvfp4", "as_multiplier", "read_nvfp4"]


def as_multiplier(name: str, t: torch.Tensor, reciprocal: bool) -> torch.Tensor:
    """A stored global or input scale as a float32 0-d multiplier (1/t for compressed-tensors' reciprocals); it
    must be one finite value > 0."""
    if t.numel() != 1:
        raise FormatError(f"{name} holds {t.numel()} values {list(t.shape)}, want one", at=name, hint=CORRUPT_SOURCE)
    v = t.detach().to(torch.float32).reshape(())
    if not bool(torch.isfinite(v)) or float(v) <= 0:
        raise FormatError(f"{name} is {float(v)}, want a finite value > 0", at=name, hint=CORRUPT_SOURCE)
    return (1.0 / v) if reciprocal else v.clone()


@dataclass(frozen=True)
class StoredNvfp4:
    names: StoredNames
    packed: torch.Tensor  # uint8 [o, i/2], as stored
    block_scale: torch.Tensor  # float8_e4m3fn [o, i/16], as stored
    scale_2: torch.Tensor  # float32 0-d multiplier
    input_scale: torch.Tensor | None  # float32 0-d multiplier (W4A4), else None

    def decode(self) -> torch.Tensor:
        """float32 values [o, i]."""
        return dequant_nvfp4(self.packed, self.block_scale, self.scale_2)


def read_nvfp4(names: StoredNames, get: Callable[[str], torch.Tensor]) -> StoredNvfp4:
    """Read one stored module through `get(name) -> tensor`; dtypes and shapes checked, errors name the tensor."""
    packed, bs = get(names.packed), get(names.block_scale)
    if packed.dtype not in (torch.uint8, torch.int8) or packed.dim() != 2:
        raise FormatError(f"{names.packed} is {packed.dtype} {list(packed.shape)}, want uint8 [out, in/2]",
                          at=names.packed, hint=CORRUPT_SOURCE)
    if bs.dtype != torch.float8_e4m3fn or tuple(bs.shape) != (packed.shape[0], packed.shape[1] * 2 // 16) \
            or packed.shape[1] % 8:
        raise FormatError(f"{names.block_scale} is {bs.dtype} {list(bs.shape)}, want float8_e4m3fn "
                          f"[{packed.shape[0]}, {packed.shape[1] * 2 // 16}] for {names.packed} {list(packed.shape)}",
                          at=names.block_scale, hint=CORRUPT_SOURCE)
    rec = names.names.reciprocal
    s2 = as_multiplier(names.global_scale, get(names.global_scale), rec)
    inp = as_multiplier(names.input_scale, get(names.input_scale), rec) if names.input_scale else None
    return StoredNvfp4(names, packed.view(torch.uint8), bs, s2, inp)
