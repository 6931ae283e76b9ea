"""Where an NVFP4 module's tensors lie in a stored checkpoint, in either layout — names only, no torch.

Both layouts hold the same bytes (E2M1 codes two a byte, element 0 in the low nibble; one float8_e4m3fn scale per
16 inputs) under other names, with the global scales stored the other way round:

| tensor       | modelopt                        | compressed-tensors                |
| ------------ | ------------------------------- | --------------------------------- |
| codes        | `weight`                        | `weight_packed`                   |
| block scales | `weight_scale`                  | `weight_scale`                    |
| global scale | `weight_scale_2` (a multiplier) | `weight_global_scale` = 1/scale_2 |
| input scale  | `input_scale` (a multiplier)    | `input_global_scale` = 1/input    |

Value = e2m1(code) × fp32(block_scale) × scale_2. The names are the output layouts' own (engine.formats.modelopt
and engine.formats.compressed_tensors, `tensor_names`). `find_nvfp4(base, present)` says which layout a module is
stored in and gives its tensors' full names; engine.formats.nvfp4.stored reads and decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.formats.compressed_tensors.layout import CompressedTensorsNvfp4Layout
from engine.formats.modelopt.layout import ModeloptNvfp4Layout
from engine.formats.nvfp4.layout import Nvfp4Names

__all__ = ["NVFP4_NAMES", "Nvfp4Names", "StoredNames", "find_nvfp4", "nvfp4_base"]

NVFP4_NAMES = (ModeloptNvfp4Layout.tensor_names, CompressedTensorsNvfp4Layout.tensor_names)


@dataclass(frozen=True)
class StoredNames:
    """Full names of one stored NVFP4 module (`input_scale` None: weight-only)."""

    names: Nvfp4Names
    base: str
    packed: str
    block_scale: str
    global_scale: str
    input_scale: str | None

    @property
    def all(self) -> tuple[str, ...]:
        return tuple(n for n in (self.packed, self.block_scale, self.global_scale, self.input_scale) if n)


def nvfp4_base(name: str) -> str | None:
    """The module of a packed-codes name (`X.weight` / `X.weight_packed` → `X`), else None."""
    for lay in NVFP4_NAMES:
        if name.endswith("." + lay.packed):
            return name[: -len(lay.packed) - 1]
    return None


def find_nvfp4(base: str, present: set[str] | frozenset[str]) -> StoredNames | None:
    """The NVFP4 module `base` as stored (codes, block scales and a global scale all present), else None."""
    for lay in NVFP4_NAMES:
        full = [f"{base}.{x}" for x in (lay.packed, lay.block_scale, lay.global_scale)]
        if all(n in present for n in full):
            inp = f"{base}.{lay.input_scale}"
            return StoredNames(lay, base, *full, inp if inp in present else None)
    return None
