"""Which block-scale tensor belongs to which weight, and whether it fits: the checks that `quantdeck inspect`
reports and that `quantdeck convert` refuses to go past (a weight decoded without its scale, or with one that
does not fit, converts to wrong values without any error). Headers only, no torch."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from engine.formats.grid import infer_block
from engine.models.base import Kind, ModelLayout

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
PACKED_FP4_DTYPES = ("I8", "U8")  # two E2M1 values a byte, with a scale per 16 (NVFP4) or 32 (MXFP4) inputs


@dataclass(frozen=True)
class ScaleProblem:
    what: str  # scale-orphan, scale-missing, scale-shape
    msg: str
    at: str  # shard:tensor
    hint: str


def companion(layout: ModelLayout, name: str, present: set[str]) -> str | None:
    """The block-scale tensor next to a weight: the layout's own name first, then the other known spellings."""
    stem = name.rsplit(".", 1)[0]
    for s in (layout.scale_name(name), stem + ".weight_scale_inv", stem + ".scale", stem + ".weight_scale"):
        if s in present and s != name:
            return s
    return None


def logical_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """The unpacked shape: an int8/uint8 weight with a scale is packed FP4, two values a byte."""
    if dtype in PACKED_FP4_DTYPES and len(shape) == 2:
        return (shape[0], shape[1] * 2)
    return tuple(shape)


def _block_key(shape, dtype: str, sshape, sdtype: str) -> str:
    """'fp8 128x128 (scale F32)'-like key of a weight's block format; ValueError when the scale does not fit."""
    o, i = logical_shape(tuple(shape), dtype)
    if dtype in PACKED_FP4_DTYPES:
        if len(sshape) != 2 or sshape[0] != o or sshape[1] == 0 or i % sshape[1]:
            raise ValueError
        return f"{'nvfp4' if sdtype == 'F8_E4M3' else 'mxfp4'} 1x{i // sshape[1]} (scale {sdtype})"
    try:
        bo, bi = infer_block((o, i), tuple(sshape))
    except Exception as e:  # noqa: BLE001 - FormatError: no block maps the weight onto the scale
        raise ValueError(getattr(e, "hint", None) or "") from e
    if bo & (bo - 1) or bi & (bi - 1):  # block formats use power-of-two tiles
        raise ValueError
    return f"{'fp8' if dtype in FP8_DTYPES else dtype.lower()} {bo}x{bi} (scale {sdtype})"


def check_scales(layout: ModelLayout, names: Iterable[str],
                 metas: Mapping[str, Any]) -> tuple[Counter, list[ScaleProblem]]:
    """(count of weights per block format, problems) over a checkpoint's tensors. `metas[n]` has `dtype_name`,
    `shape` and `shard` (engine.checkpoint.reader.TensorMeta)."""
    names = list(names)
    present = set(names)
    blocks: Counter[str] = Counter()
    out: list[ScaleProblem] = []
    for n in names:
        m = metas[n]
        w = layout.weight_of_scale(n)
        if w is not None:
            if w not in present:
                out.append(ScaleProblem("scale-orphan", f"scale {n} has no weight {w}", f"{m.shard}:{n}",
                                        "a shard is missing or the index is wrong"))
            continue
        if not n.endswith((".weight", ".weight_packed")) or len(m.shape) != 2:
            continue
        quantized = m.dtype_name in FP8_DTYPES or (m.dtype_name in PACKED_FP4_DTYPES
                                                   and layout.classify(n).kind is not Kind.OTHER)
        s = companion(layout, n, present)
        if s is None:
            if quantized:
                out.append(ScaleProblem("scale-missing", f"{m.dtype_name} weight {n} has no scale companion "
                                        f"({layout.scale_name(n)})", f"{m.shard}:{n}",
                                        "its values cannot be decoded; re-download that shard and the index"))
            continue
        sm = metas[s]
        try:
            blocks[_block_key(m.shape, m.dtype_name, sm.shape, sm.dtype_name)] += 1
        except ValueError as e:
            out.append(ScaleProblem("scale-shape", f"scale {s} {list(sm.shape)} does not fit weight {n} "
                                    f"{list(m.shape)} ({m.dtype_name})", f"{sm.shard}:{s}",
                                    str(e) or "the scale companion belongs to another tensor or the shard is "
                                              "damaged"))
    return blocks, out
