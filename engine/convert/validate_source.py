"""`quantdeck validate --against SRC`: the output compared with the checkpoint it was converted from — shapes from
the headers first (a wrong --against is named, not decoded), then each quantized module's relative error / SNR on
sampled rows, and each kept float tensor byte for byte (or within BF16 rounding where it was cast)."""

from __future__ import annotations

import math

import torch

from engine.checkpoint.reader import CheckpointReader
from engine.convert.validate import FLOATS, REL_TOL, _rows, decode_module
from engine.events import Progress
from engine.formats.nvfp4.helpers import packed_cols
from engine.models.scales import PACKED_FP4_DTYPES, logical_shape


def _is_nvfp4(r: CheckpointReader, base: str) -> bool:
    return base + ".weight_scale_2" in r or base + ".weight_global_scale" in r


def module_shape(r: CheckpointReader, base: str) -> tuple[int, ...] | None:
    """The shape module `base` decodes to, from the header alone (NVFP4 and MXFP4 pack two values a byte; NVFP4
    includes the padding of its last 16-value block); None: no such module."""
    nvfp4 = _is_nvfp4(r, base)
    w = base + ".weight_packed" if nvfp4 and base + ".weight" not in r else base + ".weight"
    if w not in r:
        return None
    m = r.meta(w)
    packed = nvfp4 or (base + ".scale" in r and m.dtype_name in PACKED_FP4_DTYPES)
    return logical_shape(m.shape, m.dtype_name) if packed else tuple(m.shape)


def _kept_floats(r: CheckpointReader, src: CheckpointReader, quantized: set[str]):
    """(name, module base or None) of each float tensor the output kept from the source, as it is or cast."""
    for n in r.names():
        base = n[: -len(".weight")] if n.endswith(".weight") else None
        if base not in quantized and n in src and r.meta(n).dtype_name in FLOATS:
            yield n, base


def _snr_db(err: float, ref: float) -> float:
    return float("inf") if err == 0 else 10 * math.log10(max(ref, 1e-30) / err)


def _fits(r: CheckpointReader, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """The output's shape `got` holds the source's `want`: equal, or NVFP4's padding of its last 16-value block."""
    return got == want or (bool(want) and _is_nvfp4(r, name) and got == want[:-1] + (2 * packed_cols(want[-1]),))


def _shape_mismatches(r: CheckpointReader, src: CheckpointReader, rep, quantized: set[str]) -> set[str]:
    """Each quantized module and kept float tensor whose shape differs from the source's, as a `source` failure
    (before anything is decoded: the values cannot be compared); returns their names."""
    pairs = [(base, module_shape(r, base), module_shape(src, base)) for base in sorted(quantized)]
    for n, base in _kept_floats(r, src, quantized):
        pairs.append((n, tuple(r.meta(n).shape), module_shape(src, base) if base else tuple(src.meta(n).shape)))
    bad = {name for name, got, want in pairs if got is not None and want is not None and not _fits(r, name, got, want)}
    for name, got, want in pairs:
        if name in bad:
            rep.fail("source", f"{name}: shape {list(got)} differs from the source's {list(want)} in {src.dir}; "
                     "is --against the checkpoint this one was converted from?", name)
    return bad


def check_source(r: CheckpointReader, src: CheckpointReader, rep, nv: list[str], fp8: list[str],
                 progress: Progress) -> set[str]:
    """The `source` check; returns the tensors whose shapes differ from the source's (not compared)."""
    quant = [(b, "nvfp4") for b in nv] + [(b, "fp8-block") for b in fp8]
    worst = 0.0
    misshapen = _shape_mismatches(r, src, rep, set(nv) | set(fp8))
    for base, enc in quant:
        w = base + ".weight"
        if w not in src:
            rep.fail("source", f"{base} has no source weight {w} in {src.dir}", base)
            continue
        if base in misshapen:
            progress.advance(1, label=base)
            continue
        sm = src.meta(w)
        cols = sm.shape[1] * (2 if sm.dtype_name in ("U8", "I8") else 1)
        rows = _rows(sm.shape[0])
        a = decode_module(r, base, rows, cols)
        b = decode_module(src, base, rows)
        if a is None or b is None or a.shape != b.shape:
            rep.fail("source", f"{base}: shape {None if a is None else list(a.shape)} vs source "
                     f"{None if b is None else list(b.shape)}", base)
            continue
        err, ref = float(((a - b) ** 2).sum()), float((b**2).sum())
        rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
        worst = max(worst, rel)
        rep.tensors.append({"tensor": base, "encoding": enc, "rel_err": round(rel, 5),
                            "snr_db": round(_snr_db(err, ref), 2), "rows": int(rows.numel())})
        if rel > REL_TOL[enc]:
            rep.fail("source", f"{base}: rel. error {rel:.3f} vs source exceeds {REL_TOL[enc]}", base)
        progress.advance(1, label=base)
    compared = 0
    for n, base in _kept_floats(r, src, set(nv) | set(fp8)):
        if n in misshapen:
            continue
        om, sm = r.meta(n), src.meta(n)
        compared += 1
        if om.dtype_name == sm.dtype_name:
            if not torch.equal(r.read_bytes(n), src.read_bytes(n)):
                rep.fail("source", f"{n} was to be kept as it is but differs from the source", n)
        else:
            a = r.get(n).float()
            b = decode_module(src, base) if base else src.get(n).float()
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            if rel > REL_TOL["bf16"]:
                rep.fail("source", f"{n}: {om.dtype_name} copy differs from the source by {rel:.4f}", n)
    rep.row("source", f"{len(quant)} quantized modules (worst rel. error {worst:.3f}), {compared} kept tensors "
            f"compared against {src.dir}" + (f"; {len(misshapen)} differ in shape" if misshapen else ""))
    return misshapen
