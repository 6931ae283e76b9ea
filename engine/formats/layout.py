"""Output layouts: how one quantized module's tensors are named and typed on disk, and the config that labels them.

A Layout is a stateless classmethod class registered by name (`Layout.get("modelopt")`):
  * `output_specs(weight_shape, has_input_scale=False)` — local tensor names → (dtype, shape), WITHOUT data,
    so the converter can write shard headers up front;
  * `pack(state)` — a module's state dict in (local names), a new dict out; the input is never modified;
  * `config(ignore, weight_only=True)` — `ConfigPieces`: the `quantization_config` for config.json
    (None removes the source's one) and extra JSON files (e.g. modelopt's `hf_quant_config.json`).

Input state keys understood by the NVFP4 layouts (other keys, e.g. `bias`, pass through unchanged):
  * `weight` — a float tensor, quantized here with `weight_scale_2` (or, if absent, its own amax); or
  * `nvfp4_packed` + `nvfp4_block_scale` — already quantized by engine.formats.nvfp4 kernels, with
    `weight_scale_2` (required then);
  * `input_scale` (fp32) or `input_amax` (→ amax/(6·448)) for calibrated W4A4; must be finite and > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from engine.core.errors import FormatError
from engine.core.registry import Registry

__all__ = ["ConfigPieces", "Layout", "TensorSpec", "layout_for", "prefixed"]


@dataclass(frozen=True)
class TensorSpec:
    """dtype and shape of one output tensor (shape () is a 0-d scalar)."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ConfigPieces:
    """`quantization_config` for config.json (None: drop the key) and extra JSON files by file name."""

    quantization_config: dict[str, Any] | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


class Layout(Registry):
    """Base of the registered output layouts. Subclasses implement the three classmethods."""

    registry_kind = "output layout"
    target: ClassVar[str] = ""  # engine.core.names.TargetFormat value this layout writes
    quantized: ClassVar[bool] = True

    @classmethod
    def output_specs(cls, weight_shape: tuple[int, int], has_input_scale: bool = False) -> dict[str, TensorSpec]:
        raise NotImplementedError

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def config(cls, ignore: list[str] | tuple[str, ...] = (), weight_only: bool = True) -> ConfigPieces:
        raise NotImplementedError

    @classmethod
    def module_specs(
        cls, module: str, weight_shape: tuple[int, int], has_input_scale: bool = False
    ) -> dict[str, TensorSpec]:
        """Full tensor names (`module.local`) → TensorSpec."""
        return {f"{module}.{k}": v for k, v in cls.output_specs(tuple(weight_shape), has_input_scale).items()}

    @classmethod
    def pack_module(cls, module: str, state: dict[str, torch.Tensor], device: str = "cpu") -> dict[str, torch.Tensor]:
        """`pack` with full names in and out (`module.weight` → `module.weight_scale`, ...)."""
        pre = module + "."
        local = {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}
        if len(local) != len(state):
            stray = sorted(k for k in state if not k.startswith(pre))
            raise FormatError(f"tensors {stray} do not belong to module {module!r}", at=module)
        return prefixed(module, cls.pack(local, device=device))


def prefixed(module: str, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{module}.{k}": v for k, v in local.items()}


def check_weight_shape(weight_shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if len(weight_shape) != 2 or min(weight_shape) <= 0:
        raise FormatError(
            f"{layout} layout needs a 2-D weight shape, got {tuple(weight_shape)}",
            at=layout,
            hint="only 2-D GEMM weights are quantized; keep other tensors as they are",
        )
    return int(weight_shape[0]), int(weight_shape[1])


def layout_for(target: str, fmt: str | None = None) -> type[Layout]:
    """The layout class for a target format (`nvfp4` needs `fmt`: modelopt | compressed-tensors)."""
    from engine.core.names import TargetFormat

    t = TargetFormat(str(target))
    if t is TargetFormat.NVFP4:
        if fmt is None:
            raise FormatError("nvfp4 needs an output format", at="format", hint="modelopt or compressed-tensors")
        return Layout.get(fmt)
    return Layout.get(t.value)
