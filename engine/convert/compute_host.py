"""The math of one work item on host arrays (engine.checkpoint.host), without torch: the CPU converter's.

NVFP4 from FP8-block and float sources — what a DeepSeek conversion is made of — runs here on the CPU
kernels (engine.formats.nvfp4.host: C, else numba), with the same rules and the same bytes as
engine.convert.compute (the torch path, which CUDA uses): the group's amax from dequantized values, one shared
`weight_scale_2`, every member quantized with it. FP8-block weights kept in BF16 (attention, MTP) are
dequantized by engine.formats.fp8_block.host; preserved tensors pass through untouched. The rest (MXFP4
sources, float weights cast to BF16, the FP8-block target) goes through engine.convert.compute on torch views
of the same memory; torch is imported then, on the first such item.
"""

from __future__ import annotations

import math

import numpy as np

from engine.checkpoint.host import HostArray
from engine.convert.amax_checks import check_finite, spread_notes
from engine.convert.plan import COPY, FLOAT, FP8, TO_BF16, TO_NVFP4, Item, ItemResult, Member
from engine.core.errors import about
from engine.formats.fp8_block import host as fb
from engine.formats.grid import infer_block
from engine.formats.kernel_mode import serial_kernels
from engine.formats.nvfp4 import host as nv


def workspace_bytes(item: Item) -> int:
    """Memory an item's math holds beyond its inputs and outputs: float32 values (and their magnitudes, for
    the amax) of members that are not FP8 with a block scale; the pipeline counts it in its in-flight budget,
    since one compute thread per core would otherwise hold several times the budget (BF16 sources)."""
    if item.action == COPY:
        return 0
    return sum(2 * 4 * math.prod(m.shape) for m in item.members if not (m.encoding == FP8 and m.scale is not None))


def native(item: Item) -> bool:
    """Does this item run here (True), or through torch (False)?"""
    if item.action == COPY:
        return True
    if item.action == TO_BF16:  # attention and MTP weights of an FP8 source, kept in BF16
        return all(m.encoding == FP8 and m.scale is not None for m in item.members)
    return item.action == TO_NVFP4 and all(m.encoding == FLOAT or m.encoding == FP8 for m in item.members)


def _block(src: dict[str, HostArray], m: Member) -> tuple[int, int]:
    return infer_block(src[m.name].shape, src[m.scale].shape)


def _values(m: Member, src: dict[str, HostArray]) -> np.ndarray:
    """float32 values of a member that is not FP8-with-scale (float weights; FP8 codes without a scale)."""
    w = src[m.name]
    if m.encoding == FP8:
        return nv.E4M3_LUT[w.data]
    return nv.float32_of(w.data, w.dtype)


def _scales(m: Member, src: dict[str, HostArray]) -> np.ndarray | None:
    """An FP8 member's block scales as float32 (checked), decoded once for its amax and its quantization."""
    if m.encoding != FP8 or m.scale is None:
        return None
    s = src[m.scale]
    return fb.block_scales_fp32(s.data, s.dtype)


def _amax(m: Member, src: dict[str, HostArray], scale: np.ndarray | None) -> np.float32:
    if scale is not None:
        return nv.fp8_block_amax(src[m.name].data, scale, _block(src, m))
    return np.float32(np.abs(_values(m, src)).max())  # NaN stays NaN


def _quantize(m: Member, src: dict[str, HostArray], scale: np.ndarray | None,
              s2: np.float32) -> tuple[np.ndarray, np.ndarray]:
    if scale is not None:
        return nv.fp8_block_to_nvfp4(src[m.name].data, scale, _block(src, m), s2)
    return nv.float_to_nvfp4(_values(m, src), s2)


# An item at most this big runs its kernels on the calling thread when the converter computes several items at
# once (`item_parallel`); a bigger one runs them over every core, so that a lone big weight (a dense MLP of
# 18432 × 7168, 132 MB of FP8, takes ~0.5 s on one core) does not keep the run waiting on one thread.
SERIAL_MAX_BYTES = 192 << 20


def compute_item(item: Item, src: dict[str, HostArray], v4_fp8: bool = False,
                 item_parallel: bool = False) -> ItemResult:
    """The canonical outputs of `item` (modelopt names for NVFP4): HostArrays, or torch tensors for an item
    that needs torch (see `native`). `item_parallel`: other threads compute other items meanwhile, so this
    one's kernels run on this thread (engine.formats.kernel_mode.serial_kernels) unless it is big."""
    if (item_parallel and item.action != COPY and native(item)
            and sum(a.nbytes for a in src.values()) <= SERIAL_MAX_BYTES):
        with serial_kernels():
            return _compute(item, src, v4_fp8)
    return _compute(item, src, v4_fp8)


def _compute(item: Item, src: dict[str, HostArray], v4_fp8: bool) -> ItemResult:
    if item.action == COPY:
        for m in item.members:  # FP8 kept as it is (the FP8-block target): refuse what decoding would refuse
            if m.encoding == FP8 and m.scale is not None:
                with about(m.name):
                    fb.check_codes(src[m.name].data)
                with about(m.scale):
                    _scales(m, src)
        return ItemResult({s.name: src[s.name] for s in item.outputs})
    if not native(item):
        from engine.convert.compute import compute_item as torch_compute

        return torch_compute(item, {k: v.torch() for k, v in src.items()}, "cpu", v4_fp8=v4_fp8)
    if item.action == TO_BF16:
        m = item.members[0]
        with about(m.name):
            bits = fb.dequant_bf16(src[m.name].data, _scales(m, src), _block(src, m))
        return ItemResult({m.name: HostArray("BF16", bits)})
    scales, amaxes = [], []
    for m in item.members:
        with about(m.name):
            scales.append(_scales(m, src))
            amaxes.append(_amax(m, src, scales[-1]))
        check_finite(m.name, amaxes[-1])
    s2 = nv.global_scale(max(amaxes))
    out: dict[str, HostArray] = {}
    for m, sc in zip(item.members, scales, strict=True):
        with about(m.name):
            packed, bs = _quantize(m, src, sc, s2)
        out[m.out_base + ".weight"] = HostArray("U8", packed)
        out[m.out_base + ".weight_scale"] = HostArray("F8_E4M3", bs)
        out[m.out_base + ".weight_scale_2"] = HostArray("F32", np.array(s2, np.float32))
    return ItemResult(out, spread_notes(item, [float(a) for a in amaxes]))
