"""What the two NVFP4 output layouts share: the same bytes under each layout's own names (`Nvfp4Names`), the specs
derived from them, and the re-labelling of the converter's canonical NVFP4 tensors.

Canonical NVFP4 tensors are modelopt's (`CANONICAL`): `weight` (codes), `weight_scale` (block scales),
`weight_scale_2` and `input_scale` (multipliers, 0-d). A layout that stores the global / input scales as
reciprocals (`reciprocal`) stores fp32(1/scale), one float32 division, shaped `scalar_shape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.checkpoint.safetensors_format import TensorSpec
from engine.core.names import TargetFormat
from engine.formats.grid import NVFP4_BLOCK, packed_cols
from engine.formats.layout import Layout, check_weight_shape

__all__ = ["CANONICAL", "Nvfp4Layout", "Nvfp4Names"]

_SCALES = ("global_scale", "input_scale")


@dataclass(frozen=True)
class Nvfp4Names:
    """One layout's local tensor names, and whether its global / input scales are stored as reciprocals."""

    layout: str
    packed: str
    block_scale: str
    global_scale: str
    input_scale: str
    reciprocal: bool  # global and input scales stored as 1/scale

    def roles(self) -> dict[str, str]:
        """local name → role (packed | block_scale | global_scale | input_scale)."""
        return {getattr(self, r): r for r in ("packed", "block_scale") + _SCALES}


CANONICAL = Nvfp4Names("modelopt", "weight", "weight_scale", "weight_scale_2", "input_scale", False)
_CANONICAL_ROLES = CANONICAL.roles()


def _split(name: str) -> tuple[str, str | None]:
    """(module, role) of a canonical NVFP4 tensor name; role None for any other name."""
    base, _, local = name.rpartition(".")
    return base, _CANONICAL_ROLES.get(local) if base else None


class Nvfp4Layout(Layout):
    """Base of the NVFP4 layouts: subclasses set `tensor_names` and `scalar_shape`, and write their own config."""

    target = TargetFormat.NVFP4.value
    tensor_names: ClassVar[Nvfp4Names] = CANONICAL
    scalar_shape: ClassVar[tuple[int, ...]] = ()  # shape of the stored global / input scale

    @classmethod
    def output_specs(cls, weight_shape, has_input_scale: bool = False) -> dict[str, TensorSpec]:
        o, i = check_weight_shape(weight_shape, cls.tensor_names.layout)
        n = cls.tensor_names
        specs = [TensorSpec(n.packed, "U8", (o, packed_cols(i))),
                 TensorSpec(n.block_scale, "F8_E4M3", (o, -(-i // NVFP4_BLOCK))),
                 TensorSpec(n.global_scale, "F32", cls.scalar_shape)]
        if has_input_scale:
            specs.append(TensorSpec(n.input_scale, "F32", cls.scalar_shape))
        return {s.name: s for s in specs}

    @classmethod
    def out_spec(cls, spec: TensorSpec, nvfp4: bool = True) -> TensorSpec:
        base, role = _split(spec.name) if nvfp4 else ("", None)
        if role is None or (role == "packed" and spec.dtype != "U8"):
            return spec
        name = f"{base}.{getattr(cls.tensor_names, role)}"
        if role in _SCALES and cls.tensor_names.reciprocal:
            return TensorSpec(name, "F32", cls.scalar_shape)
        return TensorSpec(name, spec.dtype, spec.shape)

    @classmethod
    def out_tensor(cls, name: str, t, nvfp4: bool = True):
        from engine.checkpoint.host import HostArray

        base, role = _split(name) if nvfp4 else ("", None)
        host = isinstance(t, HostArray)
        if role is None or (role == "packed" and (t.dtype != "U8" if host else str(t.dtype) != "torch.uint8")):
            return name, t
        out = f"{base}.{getattr(cls.tensor_names, role)}"
        if role in _SCALES and cls.tensor_names.reciprocal:
            return out, cls.stored_reciprocal(t)
        return out, t

    @classmethod
    def stored_reciprocal(cls, t):
        """fp32(1/t) shaped `scalar_shape`: one float32 division, the same on the host (numpy) as in torch."""
        from engine.checkpoint.host import HostArray

        if isinstance(t, HostArray):
            import numpy as np

            inv = np.float32(1.0) / t.data.astype(np.float32)
            return HostArray("F32", inv.reshape(cls.scalar_shape))
        import torch

        return (1.0 / t.to(torch.float32)).reshape(cls.scalar_shape)

    @classmethod
    def pack(cls, state: dict, device: str = "cpu") -> dict:
        from engine.formats.nvfp4.pack import nvfp4_tensors, passthrough

        t = nvfp4_tensors(state, device=device)
        n = cls.tensor_names
        out = passthrough(state)
        out[n.packed] = t.packed
        out[n.block_scale] = t.block_scale
        scales = {n.global_scale: t.scale_2, n.input_scale: t.input_scale}
        for local, s in scales.items():
            if s is not None:
                out[local] = cls.stored_reciprocal(s) if n.reciprocal else s.clone()
        return out
