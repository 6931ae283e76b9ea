"""The math of one work item: source tensors in, canonical output tensors out (engine.formats numerics).

NVFP4 follows DESIGN "Numerics": the group's amax comes from dequantized values (for FP8 sources, taken
exactly from the codes: max|code| per block × the block scale, which equals max|fp32(code)·scale|), the
members share `weight_scale_2 = global_scale(amax)`, and each member is quantized by rows — NVFP4 blocks
never cross a row, so row slabs give the same bytes as the whole tensor, with bounded memory.
"""

from __future__ import annotations

import torch

from engine.convert import kernels
from engine.convert.amax_checks import check_finite, spread_notes
from engine.convert.plan import COPY, FLOAT, FP8, MXFP4, NVFP4, TO_BF16, TO_FP8, TO_NVFP4, Item, ItemResult, Member
from engine.core.errors import FormatError, about
from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block, infer_block, scale_to_fp32
from engine.formats.mxfp4.helpers import dequant_mxfp4, mxfp4_to_nvfp4
from engine.formats.nvfp4.helpers import global_scale
from engine.formats.nvfp4.names import NVFP4_NAMES, StoredNames
from engine.formats.nvfp4.stored import StoredNvfp4, read_nvfp4

E4M3_POW2_MIN = -9


def _fp32(m: Member, src: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    w = src[m.name].to(device)
    if m.encoding == FLOAT:
        return w.to(torch.float32)
    if m.encoding == FP8:
        if m.scale is None:
            return w.to(torch.float32)
        s = src[m.scale].to(device)
        _check_fp8_source(m, w, s)
        return dequant_fp8_block(w, s, infer_block(tuple(w.shape), tuple(s.shape)))
    if m.encoding == MXFP4:
        return dequant_mxfp4(w, src[m.scale].to(device))
    if m.encoding == NVFP4:
        return _stored(m, src, device).decode()
    raise FormatError(f"cannot decode {m.name} ({m.encoding})", at=m.name)


def _stored(m: Member, src: dict[str, torch.Tensor], device: torch.device) -> StoredNvfp4:
    """An NVFP4 member as stored (either layout), its tensors on `device`."""
    names = next(lay for lay in NVFP4_NAMES if m.global_scale.endswith("." + lay.global_scale))
    stored = StoredNames(names, m.out_base, m.name, m.scale, m.global_scale, m.input_scale)
    return read_nvfp4(stored, lambda n: src[n].to(device))


def _relay_nvfp4(item: Item, src: dict[str, torch.Tensor]) -> ItemResult:
    """NVFP4 members re-laid as they are: codes and block scales byte for byte, global (and input) scales as
    multipliers (compressed-tensors' reciprocals inverted once in float32); the writer lays them out."""
    out: dict[str, torch.Tensor] = {}
    for m in item.members:
        with about(m.name):
            t = _stored(m, src, torch.device("cpu"))
        out[m.out_base + ".weight"] = t.packed
        out[m.out_base + ".weight_scale"] = t.block_scale
        out[m.out_base + ".weight_scale_2"] = t.scale_2
        if t.input_scale is not None:
            out[m.out_base + ".input_scale"] = t.input_scale
    return ItemResult(out)


def _check_fp8_source(m: Member, w: torch.Tensor, s: torch.Tensor) -> None:
    """NaN codes or a non-finite / negative block scale: a corrupt source (the host path's checks, so both
    paths refuse the same tensors)."""
    if bool(((w.view(torch.uint8) & 0x7F) == 0x7F).any()):
        raise FormatError(f"{m.name}: FP8 weight holds NaN codes", at=m.name, hint="the source is corrupt")
    sf = scale_to_fp32(s)
    if not bool(torch.isfinite(sf).all()) or bool((sf < 0).any()):
        raise FormatError(f"{m.scale}: FP8 block scale holds inf, NaN or a negative value", at=m.scale,
                          hint="the source is corrupt")


def _amax(m: Member, src: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    if m.encoding == FP8 and m.scale is not None:
        w, s = src[m.name], src[m.scale]
        return kernels.fp8_block_amax(w, s, infer_block(tuple(w.shape), tuple(s.shape)), device)
    return _fp32(m, src, device).abs().amax().cpu()


def _nvfp4_member(m: Member, src: dict[str, torch.Tensor], s2: torch.Tensor, device: torch.device):
    if m.encoding == FP8 and m.scale is not None:
        w, s = src[m.name], src[m.scale]
        return kernels.fp8_block_to_nvfp4(w, s, infer_block(tuple(w.shape), tuple(s.shape)), s2, device)
    if m.encoding == FLOAT:
        return kernels.float_to_nvfp4(src[m.name], s2, device)
    return kernels.float_to_nvfp4(_fp32(m, src, device), s2, device)


def _nvfp4_mxfp4_group(item: Item, src: dict[str, torch.Tensor], device: torch.device) -> ItemResult | None:
    """Lossless MXFP4 → NVFP4 for a whole group (one shared scale_2), or None when it cannot be exact."""
    parts = [mxfp4_to_nvfp4(src[m.name].to(device), src[m.scale].to(device)) for m in item.members]
    if not all(p[3] for p in parts):
        return None
    s2 = max(float(p[2]) for p in parts)
    out: dict[str, torch.Tensor] = {}
    for m, (packed, bs, own, _) in zip(item.members, parts, strict=True):
        ratio = float(own) / s2  # a power of two <= 1
        if ratio != 1.0:
            b = bs.to(torch.float32) * ratio
            codes_zero = _zero_blocks(packed)
            b = torch.where(codes_zero, torch.ones_like(b), b)
            if bool((b < 2.0 ** E4M3_POW2_MIN).any()):
                return None
            bs = b.to(torch.float8_e4m3fn)
        out[m.out_base + ".weight"] = packed
        out[m.out_base + ".weight_scale"] = bs
        out[m.out_base + ".weight_scale_2"] = torch.tensor(s2, dtype=torch.float32)
    return ItemResult(out)


def _zero_blocks(packed: torch.Tensor) -> torch.Tensor:
    """[o, nb16] True where a 16-element block holds only (±)0 codes."""
    p = packed.view(torch.uint8)
    mag = ((p & 0x07) != 0) | ((p & 0x70) != 0)
    return ~mag.view(p.shape[0], -1, 8).any(dim=-1)


def compute_item(item: Item, src: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                 v4_fp8: bool = False) -> ItemResult:
    """The canonical outputs of `item` (modelopt names for NVFP4), on `device`."""
    device = torch.device(device)
    if item.action == COPY:
        for m in item.members:  # FP8 kept as it is (the FP8-block target): refuse what decoding would refuse
            if m.encoding == FP8 and m.scale is not None:
                _check_fp8_source(m, src[m.name], src[m.scale])
        return ItemResult({s.name: src[s.name] for s in item.outputs})
    if device.type == "cuda":  # upload the item once: amax and quantization both read it on the device
        src = {k: v.to(device, non_blocking=True) for k, v in src.items()}
    if item.action == TO_BF16:
        m = item.members[0]
        with about(m.name):
            return ItemResult({m.out_base + ".weight": _fp32(m, src, device).to(torch.bfloat16)})
    if item.action == TO_FP8:
        m = item.members[0]
        with about(m.name):
            q, s = cast_fp8_block(_fp32(m, src, device), ue8m0=v4_fp8)
        return ItemResult({m.out_base + ".weight": q, m.out_base + (".scale" if v4_fp8 else ".weight_scale_inv"): s})
    if item.action != TO_NVFP4:  # pragma: no cover - plan only makes the four actions
        raise FormatError(f"unknown action {item.action}", at=item.key)
    notes: list[str] = []
    if all(m.encoding == NVFP4 for m in item.members):
        return _relay_nvfp4(item, {k: v.cpu() for k, v in src.items()})
    if all(m.encoding == MXFP4 for m in item.members):
        res = _nvfp4_mxfp4_group(item, src, device)
        if res is not None:
            return res
        notes = [f"{m.name}: MXFP4 exponent spread too wide for a lossless cast; requantized from its values"
                 for m in item.members]
    amaxes = []
    for m in item.members:
        with about(m.name):
            a = _amax(m, src, device).to(torch.float32)
        check_finite(m.name, a)
        amaxes.append(a)
    s2 = global_scale(torch.stack(amaxes).amax().cpu())
    notes += spread_notes(item, [float(a) for a in amaxes])
    out: dict[str, torch.Tensor] = {}
    for m in item.members:
        with about(m.name):
            packed, bs = _nvfp4_member(m, src, s2, device)
        out[m.out_base + ".weight"] = packed
        out[m.out_base + ".weight_scale"] = bs
        out[m.out_base + ".weight_scale_2"] = s2.clone()
    return ItemResult(out, notes)
