"""`quantdeck validate --against SRC`: the output compared with the checkpoint it was converted from — shapes from
the headers first (a wrong --against is named, not decoded), then each quantized module's relative error / SNR on
sampled rows, and each kept float tensor byte for byte (a large one on the same sampled rows; within BF16 rounding
where it was cast).

The comparisons run on validate's host path (engine.convert.validate_read: sampled rows of the source read and
decoded with numpy, the output's values from its one read); a module or tensor it does not decode is compared with
the torch references here (`compare_torch`, `kept_torch`), as before."""

from __future__ import annotations

import math

import numpy as np

from engine.checkpoint.reader import CheckpointReader
from engine.convert import validate_read as host
from engine.convert.validate_ref import REL_TOL, decode_module, sampled_rows
from engine.formats.grid import infer_block, packed_cols
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


def kept_floats(r: CheckpointReader, src: CheckpointReader, quantized: set[str]):
    """(name, module base or None) of each float tensor the output kept from the source, as it is or cast."""
    for n in r.names():
        base = n[: -len(".weight")] if n.endswith(".weight") else None
        if base not in quantized and n in src and r.meta(n).dtype_name in host.FLOAT_DTYPES:
            yield n, base


def _snr_db(err: float, ref: float) -> float:
    return float("inf") if err == 0 else 10 * math.log10(max(ref, 1e-30) / err)


def _fits(r: CheckpointReader, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """The output's shape `got` holds the source's `want`: equal, or NVFP4's padding of its last 16-value block."""
    return got == want or (bool(want) and _is_nvfp4(r, name) and got == want[:-1] + (2 * packed_cols(want[-1]),))


def shape_mismatches(r: CheckpointReader, src: CheckpointReader, quantized: set[str]) -> tuple[list, set[str]]:
    """Each quantized module and kept float tensor whose shape differs from the source's, from the headers (before
    anything is decoded: the values cannot be compared): ([(name, message)], their names)."""
    pairs = [(base, module_shape(r, base), module_shape(src, base)) for base in sorted(quantized)]
    for n, base in kept_floats(r, src, quantized):
        pairs.append((n, tuple(r.meta(n).shape), module_shape(src, base) if base else tuple(src.meta(n).shape)))
    bad = {name for name, got, want in pairs if got is not None and want is not None and not _fits(r, name, got, want)}
    fails = [(name, f"{name}: shape {list(got)} differs from the source's {list(want)} in {src.dir}; "
                    "is --against the checkpoint this one was converted from?")
             for name, got, want in pairs if name in bad]
    return fails, bad


# -- the host path -----------------------------------------------------------------------------------------------------
def source_values(src: host.HostReader, base: str, rows: np.ndarray | None) -> np.ndarray:
    """float32 values of the source's `base.weight` (rows `rows`, or all), as decode_module gives them; Unsupported
    for what only the reference decodes (MXFP4, unusual scale dtypes)."""
    sr = src.r
    w = base + ".weight"
    m = sr.meta(w)
    if m.dtype_name == "F8_E4M3" and len(m.shape) == 2 and m.nbytes:
        rows = np.arange(m.shape[0]) if rows is None else rows
        sc = next((s for s in (base + ".weight_scale_inv", base + ".scale") if s in sr), None)
        codes = src.rows(w, rows, slot="src-codes")
        if sc is None:
            return np.take(host.E4M3_LUT, codes, mode="clip")
        smeta = sr.meta(sc)
        try:
            block = infer_block(m.shape, smeta.shape)
        except Exception:  # noqa: BLE001 - the reference names it
            raise host.Unsupported(w) from None
        return host.fp8_values(codes, rows, host.scale_values(src.full(sc), smeta.dtype_name, smeta.shape), block,
                               m.shape[1], slot="src-values")
    if m.dtype_name in host.FLOAT_DTYPES and not (base + ".scale" in sr and m.dtype_name in PACKED_FP4_DTYPES):
        if rows is None:
            return host.float32_values(src.full(w), m.dtype_name, m.shape)
        if len(m.shape) != 2:
            raise host.Unsupported(w)
        return host.float32_values(src.rows(w, rows), m.dtype_name, (len(rows), m.shape[1]))
    raise host.Unsupported(w)


def compare_host(src: host.HostReader, base: str, enc: str, decoded: tuple) -> dict:
    """One quantized module against the source on the sampled rows: {err, ref, rows}; `decoded` is what
    validate's host path kept of the output module (nvfp4: packed, block scales, scale_2; fp8: codes, scales,
    block)."""
    sm = src.r.meta(base + ".weight")
    if len(sm.shape) != 2 or sm.dtype_name in PACKED_FP4_DTYPES or sm.shape[0] == 0:
        raise host.Unsupported(base)
    rows = host.sample_rows(sm.shape[0])
    if enc == "nvfp4":
        packed, bs, s2 = decoded
        if rows[-1] >= packed.shape[0] or not 0 < sm.shape[1] <= 2 * packed.shape[1]:
            raise host.Unsupported(base)
        a = host.nvfp4_values(packed, bs, s2, sm.shape[1], rows=rows, slot="out-values")
    else:
        codes, s32, block = decoded
        if rows[-1] >= codes.shape[0]:
            raise host.Unsupported(base)
        a = host.fp8_values(codes[rows], rows, s32, block, codes.shape[1], slot="out-values")
    b = source_values(src, base, rows)
    if a.shape != b.shape:
        raise host.Unsupported(base)
    if not a.flags.c_contiguous:  # NVFP4's padded columns cut off
        a = np.ascontiguousarray(a)
    err, ref = host.rel_error(a, b)
    return {"err": err, "ref": ref, "rows": int(len(rows))}


KEPT_WHOLE_BYTES = 64 << 20  # a kept tensor up to this size is compared whole; a larger 2-D one on sampled rows


def kept_host(src: host.HostReader, r: CheckpointReader, name: str, base: str | None, data: np.ndarray) -> dict:
    """A kept float tensor (its output bytes `data`) against the source: {equal} when stored alike, else {rel}.
    A large 2-D one stored alike (embeddings, the LM head: 1.9 GB each at DeepSeek's widths) is compared on the
    sampled rows of the quantized modules ({equal, rows}); the output's bytes are still all read and hashed."""
    om, sm = r.meta(name), src.r.meta(name)
    if om.dtype_name == sm.dtype_name:
        if om.nbytes != sm.nbytes:
            return {"equal": False}
        if len(om.shape) == 2 and om.shape == sm.shape and om.nbytes > KEPT_WHOLE_BYTES:
            rows = host.sample_rows(om.shape[0])
            mine = data.reshape(om.shape[0], -1)[rows]
            return {"equal": bool(np.array_equal(mine, src.rows(name, rows, slot="src-rows"))), "rows": len(rows)}
        return {"equal": bool(np.array_equal(data, src.full(name, slot="src-tensor")))}
    a = host.float32_values(data, om.dtype_name, om.shape)
    b = source_values(src, base, None) if base else host.float32_values(src.full(name), sm.dtype_name, sm.shape)
    if a.shape != b.shape:
        raise host.Unsupported(name)
    err, ref = host.rel_error(a, b)
    return {"rel": math.sqrt(err) / max(math.sqrt(ref), 1e-30)}


# -- the torch references -------------------------------------------------------------------------------------------
def compare_torch(r: CheckpointReader, src: CheckpointReader, base: str) -> dict:
    """compare_host's reference: {err, ref, rows}, or {bad: message} when the decoded shapes differ."""
    sm = src.meta(base + ".weight")
    cols = sm.shape[1] * (2 if sm.dtype_name in ("U8", "I8") else 1)
    rows = sampled_rows(sm.shape[0])
    a = decode_module(r, base, rows, cols)
    b = decode_module(src, base, rows)
    if a is None or b is None or a.shape != b.shape:
        return {"bad": f"{base}: shape {None if a is None else list(a.shape)} vs source "
                       f"{None if b is None else list(b.shape)}"}
    return {"err": float(((a - b) ** 2).sum()), "ref": float((b**2).sum()), "rows": int(rows.numel())}


def kept_torch(r: CheckpointReader, src: CheckpointReader, n: str, base: str | None) -> dict:
    """kept_host's reference."""
    import torch

    if r.meta(n).dtype_name == src.meta(n).dtype_name:
        return {"equal": torch.equal(r.read_bytes(n), src.read_bytes(n))}
    a = r.get(n).float()
    b = decode_module(src, base) if base else src.get(n).float()
    return {"rel": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def emit_source(r: CheckpointReader, src: CheckpointReader, rep, nv: list[str], fp8: list[str],
                shape_fails: list, misshapen: set[str], modules: dict, kept: dict) -> None:
    """The `source` check's findings, in order: shapes, then each quantized module, then each kept tensor
    (`modules` / `kept`: the host path's results; a missing or None one is computed by the reference here)."""
    quant = [(b, "nvfp4") for b in nv] + [(b, "fp8-block") for b in fp8]
    worst = 0.0
    for name, msg in shape_fails:
        rep.fail("source", msg, name)
    for base, enc in quant:
        w = base + ".weight"
        if w not in src:
            rep.fail("source", f"{base} has no source weight {w} in {src.dir}", base)
            continue
        if base in misshapen:
            continue
        res = modules.get(base) or compare_torch(r, src, base)
        if "bad" in res:
            rep.fail("source", res["bad"], base)
            continue
        err, ref = res["err"], res["ref"]
        rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
        worst = max(worst, rel)
        rep.tensors.append({"tensor": base, "encoding": enc, "rel_err": round(rel, 5),
                            "snr_db": round(_snr_db(err, ref), 2), "rows": res["rows"]})
        if rel > REL_TOL[enc]:
            rep.fail("source", f"{base}: rel. error {rel:.3f} vs source exceeds {REL_TOL[enc]}", base)
    compared = sampled = 0
    for n, base in kept_floats(r, src, set(nv) | set(fp8)):
        if n in misshapen:
            continue
        compared += 1
        res = kept.get(n) or kept_torch(r, src, n, base)
        sampled += "rows" in res
        if "equal" in res:
            if not res["equal"]:
                rep.fail("source", f"{n} was to be kept as it is but differs from the source", n)
        elif res["rel"] > REL_TOL["bf16"]:
            rep.fail("source", f"{n}: {r.meta(n).dtype_name} copy differs from the source by {res['rel']:.4f}", n)
    rep.row("source", f"{len(quant)} quantized modules (worst rel. error {worst:.3f}), {compared} kept tensors "
            f"compared against {src.dir}" + (f" ({sampled} large ones on sampled rows)" if sampled else "")
            + (f"; {len(misshapen)} differ in shape" if misshapen else ""))
