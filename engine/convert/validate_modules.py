"""validate's per-module checks of quantized weights: which modules are NVFP4 or FP8-block, and each one's scale
and decode findings, on the host (numpy, every byte read once by the tensors' pass) or, where the host path does
not take a module, with the torch reference (engine.convert.validate_ref.decode_module).

A module's findings are a list of events in the order the checks meet them: ("scales" | "decode", msg, at), and
("group", global scale, its tensor), where the fused-group rule (gate/up, w1/w3, ... share one global scale) is
checked against the modules before it (`emit_scales_and_decode`)."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from engine.checkpoint.reader import CheckpointReader
from engine.convert import validate_read as host
from engine.convert.validate_ref import decode_module
from engine.formats.grid import infer_block
from engine.formats.nvfp4.names import NVFP4_NAMES

FLOATS = host.FLOAT_DTYPES


class Report(Protocol):
    """Where findings go (validate's report): a failure of a check, and the check's row."""

    def fail(self, check: str, msg: str, at: str | None = None) -> None: ...

    def row(self, check: str, detail: str) -> None: ...


def nvfp4_bases(names: list[str]) -> list[str]:
    out = []
    for n in names:
        for suf in ("." + lay.global_scale for lay in NVFP4_NAMES):
            if n.endswith(suf):
                out.append(n[: -len(suf)])
    return out


def fp8_bases(r: CheckpointReader) -> list[str]:
    out = []
    for n in r.names():
        if n.endswith(".weight") and r.meta(n).dtype_name == "F8_E4M3":
            out.append(n[: -len(".weight")])
    return out


# -- scales and decode ------------------------------------------------------------------------------------------------
# A module's findings are a list of events in the order the checks meet them: ("scales" | "decode", msg, at), and
# ("group", global scale, its tensor) where the fused-group rule is checked against the modules before it.

def stored_name(r: CheckpointReader, base: str, role: str) -> str:
    """`base`'s NVFP4 tensor of `role` (packed | global_scale) under the names of the layout that holds it (the last
    layout's name when none does, so the error names it)."""
    names = [f"{base}.{getattr(lay, role)}" for lay in NVFP4_NAMES]
    return next((n for n in names if n in r), names[-1])


def _s2_name(r: CheckpointReader, base: str) -> str:
    return stored_name(r, base, "global_scale")


def _nvfp4_events_torch(r: CheckpointReader, base: str) -> list[tuple]:
    """The reference: one NVFP4 module's scale and decode findings, decoded with torch."""
    import torch

    ev: list[tuple] = []
    try:
        s2n = _s2_name(r, base)
        s2 = r.get(s2n).float().reshape(-1)[0]
        if not bool(torch.isfinite(s2)) or float(s2) <= 0:
            return [("scales", f"{s2n} is {float(s2)}: must be finite and > 0", s2n)]
        bs = r.get(base + ".weight_scale").float()
        if not bool(torch.isfinite(bs).all()) or bool((bs <= 0).any()):
            bad = int((~torch.isfinite(bs) | (bs <= 0)).sum())
            ev.append(("scales", f"{base}.weight_scale has {bad} block scale(s) that are not finite and > 0",
                       base + ".weight_scale"))
        ev.append(("group", float(s2) if s2n.endswith("_scale_2") else 1.0 / float(s2), s2n))
        if not bool(torch.isfinite(decode_module(r, base)).all()):
            ev.append(("decode", f"{base} decodes to non-finite values", base))
    except Exception as e:  # noqa: BLE001 - a broken tensor is a finding, not a crash
        ev.append(("decode", f"{base}: cannot decode ({e})", base))
    return ev


def _fp8_events_torch(r: CheckpointReader, base: str) -> list[tuple]:
    """The reference: one FP8-block module's scale and decode findings, decoded with torch."""
    import torch

    sc = next((s for s in (base + ".weight_scale_inv", base + ".scale") if s in r), None)
    if sc is None:
        return []
    ev: list[tuple] = []
    sf = r.get(sc).float()
    if not bool(torch.isfinite(sf).all()) or bool((sf <= 0).any()):
        ev.append(("scales", f"{sc} holds scales that are not finite and > 0", sc))
    try:
        if not bool(torch.isfinite(decode_module(r, base)).all()):
            ev.append(("decode", f"{base} decodes to non-finite values", base))
    except Exception as e:  # noqa: BLE001
        ev.append(("decode", f"{base}: cannot decode ({e})", base))
    return ev


def nvfp4_parts(r: CheckpointReader, base: str) -> tuple[str, str, str]:
    """(packed weight, block scales, global scale) names of a well-formed NVFP4 module; Unsupported otherwise."""
    w = stored_name(r, base, "packed")
    bsn, s2n = base + ".weight_scale", _s2_name(r, base)
    if w not in r or bsn not in r or s2n not in r:
        raise host.Unsupported(base)
    pm, sm, s2m = r.meta(w), r.meta(bsn), r.meta(s2n)
    if (pm.dtype_name != "U8" or len(pm.shape) != 2 or pm.shape[1] % 8 or sm.dtype_name != "F8_E4M3"
            or sm.shape != (pm.shape[0], pm.shape[1] // 8) or s2m.dtype_name != "F32" or math.prod(s2m.shape) != 1):
        raise host.Unsupported(base)
    return w, bsn, s2n


def nvfp4_host(out: host.HostReader, base: str) -> tuple[list[tuple], dict[str, bool], tuple | None]:
    """One NVFP4 module read whole and checked on the host: (events as _nvfp4_events_torch gives them, finiteness of
    its float tensors, (packed, block scales, float32 scale_2) for the source comparison, or None where the
    reference must decode it)."""
    r = out.r
    w, bsn, s2n = nvfp4_parts(r, base)
    packed = out.full(w, slot="packed").reshape(r.meta(w).shape)
    bs = out.full(bsn, slot="scales").reshape(r.meta(bsn).shape)
    s2raw = out.full(s2n).view(np.float32)
    floats = {s2n: bool(np.isfinite(s2raw).all())}
    s2 = s2raw.reshape(-1)[0]
    if not np.isfinite(s2) or s2 <= 0:
        return [("scales", f"{s2n} is {float(s2)}: must be finite and > 0", s2n)], floats, None
    with np.errstate(all="ignore"):
        s2_dec = s2 if s2n.endswith("_scale_2") else np.float32(1.0) / s2  # as decode_module divides
    if not (np.isfinite(s2_dec) and s2_dec > 0):
        raise host.Unsupported(base)  # the reference raises from as_scale_2: its message, not ours
    ev: list[tuple] = []
    nan, bad, top_mag = host.scan_e4m3(bs)
    if bad:
        ev.append(("scales", f"{base}.weight_scale has {bad} block scale(s) that are not finite and > 0", bsn))
    ev.append(("group", float(s2) if s2n.endswith("_scale_2") else 1.0 / float(s2), s2n))
    if nan:
        finite = False
    elif bs.size == 0:
        finite = True
    else:  # |value| <= 6 · fl(max|scale| · scale_2): finite when that is (rounding is monotone); else decode it all
        with np.errstate(all="ignore"):
            top = np.float32(6) * (host.E4M3_LUT[top_mag] * s2_dec)
        finite = bool(np.isfinite(top)) or bool(np.isfinite(host.nvfp4_values(packed, bs, s2_dec, None)).all())
    if not finite:
        ev.append(("decode", f"{base} decodes to non-finite values", base))
    return ev, floats, (packed, bs, s2_dec)


def _fp8_read(out: host.HostReader, base: str) -> tuple[str, str, np.ndarray, np.ndarray, np.ndarray, tuple]:
    """An FP8-block module read whole: (its scale's name, the scale's dtype, codes [rows, cols], the scale's bytes,
    its float32 values, the block); Unsupported for what only the reference decodes."""
    r = out.r
    sc = next((s for s in (base + ".weight_scale_inv", base + ".scale") if s in r), None)
    if sc is None:
        raise host.Unsupported(base)
    wm, smeta = r.meta(base + ".weight"), r.meta(sc)
    if len(wm.shape) != 2 or not wm.nbytes or smeta.dtype_name not in ("F32", "BF16", "F16", "F8_E8M0"):
        raise host.Unsupported(base)
    try:
        block = infer_block(wm.shape, smeta.shape)
    except Exception:  # noqa: BLE001 - the reference names it
        raise host.Unsupported(base) from None
    codes = out.full(base + ".weight", slot="packed").reshape(wm.shape)
    raw = out.full(sc)
    return sc, smeta.dtype_name, codes, raw, host.scale_values(raw, smeta.dtype_name, smeta.shape), block


def fp8_host(out: host.HostReader, base: str) -> tuple[list[tuple], dict[str, bool], tuple | None]:
    """One FP8-block module read whole and checked on the host (as nvfp4_host; the third item is (codes, float32
    scales, block))."""
    sc, sdtype, codes, raw, s32, block = _fp8_read(out, base)
    rows, cols = codes.shape
    floats = {sc: host.all_finite(raw, sdtype)} if sdtype in FLOATS else {}
    ev: list[tuple] = []
    with np.errstate(invalid="ignore"):
        if not np.isfinite(s32).all() or bool((s32 <= 0).any()):
            ev.append(("scales", f"{sc} holds scales that are not finite and > 0", sc))
        if bool(((codes & 0x7F) == 0x7F).any()) or not np.isfinite(s32).all():
            finite = False
        else:
            top = np.float32(448) * np.float32(np.abs(s32).max())
            finite = bool(np.isfinite(top)) or bool(np.isfinite(
                host.fp8_values(codes, np.arange(rows), s32, block, cols)).all())
    if not finite:
        ev.append(("decode", f"{base} decodes to non-finite values", base))
    return ev, floats, (codes, s32, block)


def module_values(out: host.HostReader, base: str, cols: int) -> np.ndarray | None:
    """float32 values [rows, cols] of a whole NVFP4 or FP8-block module on the host, decode_module's bit for bit
    (the C kernels where they build, else numpy); None where only the reference decodes it (other encodings,
    unusual scales): the caller takes decode_module then."""
    r = out.r
    try:
        if base + ".weight_scale_2" in r or base + ".weight_global_scale" in r:
            _, _, decoded = nvfp4_host(out, base)
            if decoded is None or not 0 < cols <= 2 * decoded[0].shape[1]:
                return None
            return np.ascontiguousarray(host.nvfp4_values(*decoded, cols))
        w = base + ".weight"
        if w in r and r.meta(w).dtype_name == "F8_E4M3" and len(r.meta(w).shape) == 2:
            _, _, codes, _, s32, block = _fp8_read(out, base)  # read only: validate's pass does the checks
            return host.fp8_values(codes, np.arange(codes.shape[0]), s32, block, codes.shape[1])
    except host.Unsupported:
        return None
    return None


def emit_scales_and_decode(r: CheckpointReader, rep: Report, nv: list[str], fp8: list[str], layout,
                            events: dict[str, list[tuple] | None], floats: dict[str, bool]) -> None:
    group_s2: dict[str, tuple[float, str]] = {}
    for base in nv:
        ev = events.get(base)
        for kind, a, b in ev if ev is not None else _nvfp4_events_torch(r, base):
            if kind != "group":
                rep.fail(kind, a, b)
                continue
            try:
                key = layout.classify(base + ".weight", quantize_attention=True).fused_group if layout else None
            except Exception as e:  # noqa: BLE001 - as the reference, inside its try
                rep.fail("decode", f"{base}: cannot decode ({e})", base)
                break
            if key:
                if key in group_s2 and group_s2[key][0] != a:
                    rep.fail("scales", f"{base} and {group_s2[key][1]} are one fused group but have global scales "
                             f"{a!r} and {group_s2[key][0]!r}", b)
                group_s2.setdefault(key, (a, base))
    for base in fp8:
        ev = events.get(base)
        for kind, a, b in ev if ev is not None else _fp8_events_torch(r, base):
            rep.fail(kind, a, b)
    n_float = 0
    for n in r.names():
        if r.meta(n).dtype_name in FLOATS:
            n_float += 1
            ok = floats.get(n)
            if ok is None:
                ok = host.all_finite(r.get_host(n).raw(), r.meta(n).dtype_name)
            if not ok:
                rep.fail("decode", f"{n} holds NaN or Inf", n)
    rep.row("scales", f"{len(nv) + len(fp8)} scale sets, {len(group_s2)} fused groups share their global scale")
    rep.row("decode", f"{len(nv) + len(fp8)} quantized modules decode, {n_float} float tensors finite")
