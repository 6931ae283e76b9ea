"""Output layouts: the one home of each output format — how a quantized module's tensors are named, typed and
encoded on disk, and the quantization config that labels them. Convert and export write through them.

A Layout is a stateless classmethod class registered by name (`Layout.get("modelopt")`; `layout_for` picks the one
a conversion writes); importing it (or any layout) imports no torch, since the CPU converter plans and writes
through it:
  * `output_specs(weight_shape, has_input_scale=False)` — local tensor names → TensorSpec, WITHOUT data,
    so the converter can write shard headers up front;
  * `out_spec(spec, nvfp4)` / `out_tensor(name, t, nvfp4)` — one of the converter's canonical output tensors
    (an NVFP4 module's in modelopt's names, its scales as multipliers; any other as it is) as this layout
    names, shapes and stores it;
  * `pack(state)` — a module's state dict in (local names), a new dict out; the input is never modified;
  * `config(modules, w4a4=False)` — `ConfigPieces`: the `quantization_config` for config.json (None: none)
    and extra JSON files (modelopt's `hf_quant_config.json`); `output_config` makes the whole config.json.

Input state keys understood by the NVFP4 layouts (other keys, e.g. `bias`, pass through unchanged):
  * `weight` — a float tensor, quantized here with `weight_scale_2` (or, if absent, its own amax); or
  * `nvfp4_packed` + `nvfp4_block_scale` — already quantized by engine.formats.nvfp4 kernels, with
    `weight_scale_2` (required then);
  * `input_scale` (fp32) or `input_amax` (→ amax/(6·448)) for calibrated W4A4; must be finite and > 0.
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine import __version__
from engine.checkpoint.safetensors_format import TensorSpec
from engine.core.errors import FormatError
from engine.core.registry import Registry

__all__ = ["ConfigPieces", "Layout", "Modules", "TensorSpec", "layout_for", "natural_key", "prefixed"]

_LAYOUT_MODULES = ("modelopt", "compressed_tensors", "fp8_block", "bf16")
PRODUCER = {"name": "quantdeck", "version": __version__}  # what our configs name as their writer


def natural_key(name: str) -> tuple:
    """Sort key that orders module names as they read (`layers.2` before `layers.10`)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class Modules:
    """An output's GEMM modules: those kept unquantized (its ignore / exclude list), those quantized, and the MTP
    ones among them; each in natural order."""

    kept: tuple[str, ...] = ()
    quantized: tuple[str, ...] = ()
    mtp: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigPieces:
    """`quantization_config` for config.json (None: drop the key) and extra JSON files by file name."""

    quantization_config: dict[str, Any] | None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_layouts() -> None:
    """Import (so register) every layout module; a lookup by name sees them all, however Layout was imported."""
    for sub in _LAYOUT_MODULES:
        importlib.import_module(f"engine.formats.{sub}.layout")


class Layout(Registry):
    """Base of the registered output layouts. Subclasses implement output_specs, pack and config, and re-label
    the canonical tensors (out_spec / out_tensor) where their names or encoding differ."""

    registry_kind = "output layout"
    target: ClassVar[str] = ""  # engine.core.names.TargetFormat value this layout writes
    quantized: ClassVar[bool] = True

    @classmethod
    def get(cls, name) -> type["Layout"]:
        load_layouts()
        return super().get(name)

    @classmethod
    def names(cls) -> list[str]:
        load_layouts()
        return super().names()

    @classmethod
    def output_specs(cls, weight_shape: tuple[int, int], has_input_scale: bool = False) -> dict[str, TensorSpec]:
        raise NotImplementedError

    @classmethod
    def pack(cls, state: dict, device: str = "cpu") -> dict:
        raise NotImplementedError

    @classmethod
    def config(cls, modules: Modules, w4a4: bool = False) -> ConfigPieces:
        """The labels of an output whose GEMM modules are `modules`; `w4a4`: its NVFP4 modules carry input
        scales (calibrated activations)."""
        raise NotImplementedError

    @classmethod
    def output_config(cls, src_config: dict[str, Any], pieces: ConfigPieces) -> dict[str, Any]:
        """config.json: the source's without its quantization labels (DeepSeek's FP8 `quantization_config`, V4's
        top-level `expert_dtype`, which transformers moves in), plus this layout's `pieces`."""
        cfg = copy.deepcopy(src_config)
        for key in ("quantization_config", "compression_config", "expert_dtype"):
            cfg.pop(key, None)
        if pieces.quantization_config is not None:
            cfg["quantization_config"] = pieces.quantization_config
        return cfg

    @classmethod
    def label_problems(cls, directory, qc: dict[str, Any], n: int, w4a4: bool = False) -> list[tuple[str, str]]:
        """(message, at) for each way the labels of an output in this layout (config.json's `qc`, the extra files
        in `directory`) disagree with its `n` quantized modules; `quantdeck validate` reports them."""
        return []

    @classmethod
    def out_spec(cls, spec: TensorSpec, nvfp4: bool = True) -> TensorSpec:
        """A canonical output tensor's spec as this layout writes it (`nvfp4`: it belongs to an NVFP4-quantized
        module). Unchanged unless the layout names or stores it otherwise."""
        return spec

    @classmethod
    def out_tensor(cls, name: str, t, nvfp4: bool = True):
        """(name, tensor) of a canonical output tensor (torch or HostArray) as this layout writes it: the value
        side of out_spec."""
        return name, t

    @classmethod
    def module_specs(
        cls, module: str, weight_shape: tuple[int, int], has_input_scale: bool = False
    ) -> dict[str, TensorSpec]:
        """Full tensor names (`module.local`) → TensorSpec."""
        specs = cls.output_specs(tuple(weight_shape), has_input_scale)
        return {f"{module}.{k}": TensorSpec(f"{module}.{k}", v.dtype, v.shape) for k, v in specs.items()}

    @classmethod
    def pack_module(cls, module: str, state: dict, device: str = "cpu") -> dict:
        """`pack` with full names in and out (`module.weight` → `module.weight_scale`, ...)."""
        pre = module + "."
        local = {k[len(pre) :]: v for k, v in state.items() if k.startswith(pre)}
        if len(local) != len(state):
            stray = sorted(k for k in state if not k.startswith(pre))
            raise FormatError(f"tensors {stray} do not belong to module {module!r}", at=module)
        return prefixed(module, cls.pack(local, device=device))


def prefixed(module: str, local: dict) -> dict:
    return {f"{module}.{k}": v for k, v in local.items()}


def check_weight_shape(weight_shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    if len(weight_shape) != 2 or min(weight_shape) <= 0:
        raise FormatError(
            f"{layout} layout needs a 2-D weight shape, got {tuple(weight_shape)}",
            at=layout,
            hint="only 2-D GEMM weights are quantized; keep other tensors as they are",
        )
    return int(weight_shape[0]), int(weight_shape[1])


def layout_for(target: str, fmt: str | None = None, family: str | None = None) -> type[Layout]:
    """The layout a conversion to `target` writes: for `nvfp4` the output format `fmt` (modelopt |
    compressed-tensors); for `fp8-block` DeepSeek's, with V4's UE8M0 `.scale` for a `deepseek-v4` family; `fmt`
    is ignored for the targets with one layout."""
    from engine.core.names import Family, TargetFormat

    t = TargetFormat(str(target))
    if t is TargetFormat.NVFP4:
        if fmt is None:
            raise FormatError("nvfp4 needs an output format", at="format", hint="modelopt or compressed-tensors")
        return Layout.get(fmt)
    if t is TargetFormat.FP8_BLOCK and family is not None and str(family) == Family.DEEPSEEK_V4.value:
        return Layout.get("fp8-block-ue8m0")
    return Layout.get(t.value)
