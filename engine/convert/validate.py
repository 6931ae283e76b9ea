"""validate: check a produced checkpoint without a GPU, and optionally against its source.

Checks (each a row of the report; any failure names the tensor and makes `ok` false):
  index       the index and the shards agree (CheckpointReader), manifest sha256 of every shard
  layout      every NVFP4 / FP8-block module has the tensors, dtypes and shapes its layout needs; the ignore /
              exclude list names exactly the GEMMs that were kept
  scales      every scale finite and > 0; fused groups (gate/up, w1/w3, ...) share one global scale
  decode      every quantized tensor decodes to finite values; no NaN/Inf in any float tensor
  source      (--against) per quantized tensor rel. error and SNR vs the dequantized source (sampled rows);
              preserved tensors equal (or BF16-close when the source was FP8)
  block       (--against, V3 and V4 families) decoder layer 0, dequantized to fp32 and run with transformers' own
              decoder-layer class, matches the source layer within BLOCK_TOL on random hidden states
"""

from __future__ import annotations

import fnmatch
import math
import os
from pathlib import Path
from typing import Any

import torch

from engine.convert.validate_config import label_problems
from engine.checkpoint.manifest import load_manifest
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.digest import matches
from engine.errors import CheckpointError
from engine.events import EventSink, NullSink, Progress
from engine.formats.fp8_block.helpers import dequant_fp8_block, infer_block, scale_grid
from engine.formats.nvfp4.helpers import dequant_nvfp4

# Relative-error ceilings per encoding (random Gaussian weights give ~0.09 for NVFP4, ~0.02 for FP8).
REL_TOL = {"nvfp4": 0.2, "fp8-block": 0.06, "bf16": 0.01}
# Decoder block: ||Δ_out − Δ_src|| / ||Δ_src|| with Δ = layer(x) − x.
BLOCK_TOL = {"nvfp4": 0.2, "fp8-block": 0.1, "bf16": 0.02, "none": 0.02}
SAMPLE_ROWS = 256
FLOATS = ("F32", "F16", "BF16", "F64")


class _Report:
    def __init__(self, directory: Path):
        self.checks: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.tensors: list[dict[str, Any]] = []
        self.dir = directory

    def fail(self, check: str, msg: str, at: str | None = None) -> None:
        self.failures.append({"check": check, "msg": msg, "at": at})

    def row(self, check: str, detail: str) -> None:
        n = sum(1 for f in self.failures if f["check"] == check)
        self.checks.append({"check": check, "status": "FAIL" if n else "ok", "failures": n, "detail": detail})

    def skip(self, check: str, why: str) -> None:
        self.checks.append({"check": check, "status": "skipped", "failures": 0, "detail": why})


def _rows(n: int) -> torch.Tensor:
    if n <= SAMPLE_ROWS:
        return torch.arange(n)
    return torch.linspace(0, n - 1, SAMPLE_ROWS).round().long().unique()


def decode_module(r: CheckpointReader, base: str, rows: torch.Tensor | None = None,
                  cols: int | None = None) -> torch.Tensor | None:
    """fp32 values of module `base` in any encoding quantdeck reads or writes (None: no such module)."""
    w = base + ".weight"
    if base + ".weight_scale_2" in r or base + ".weight_global_scale" in r:
        packed = r.get(w if w in r else base + ".weight_packed")
        bs = r.get(base + ".weight_scale")
        if base + ".weight_scale_2" in r:
            s2 = r.get(base + ".weight_scale_2").float().reshape(())
        else:
            s2 = 1.0 / r.get(base + ".weight_global_scale").float().reshape(())
        if rows is not None:
            packed, bs = packed[rows], bs[rows]
        shape = (packed.shape[0], cols) if cols else None
        return dequant_nvfp4(packed, bs, s2, shape)
    if w not in r:
        return None
    t = r.get(w)
    if t.dtype == torch.float8_e4m3fn:
        for sc in (base + ".weight_scale_inv", base + ".scale"):
            if sc in r:
                s = r.get(sc)
                out = dequant_fp8_block(t, s, infer_block(tuple(t.shape), tuple(s.shape)))
                return out[rows] if rows is not None else out
        return t.float()[rows] if rows is not None else t.float()
    if t.dtype in (torch.uint8, torch.int8) and base + ".scale" in r:
        from engine.formats.mxfp4.helpers import dequant_mxfp4

        out = dequant_mxfp4(t, r.get(base + ".scale"))
        return out[rows] if rows is not None else out
    t = t.float()
    return t[rows] if rows is not None and t.dim() >= 1 else t


def _nvfp4_bases(names: list[str]) -> list[str]:
    out = []
    for n in names:
        for suf in (".weight_scale_2", ".weight_global_scale"):
            if n.endswith(suf):
                out.append(n[: -len(suf)])
    return out


def _fp8_bases(r: CheckpointReader) -> list[str]:
    out = []
    for n in r.names():
        if n.endswith(".weight") and r.meta(n).dtype_name == "F8_E4M3":
            out.append(n[: -len(".weight")])
    return out


def _check_index(r_dir: Path, rep: _Report) -> CheckpointReader | None:
    try:
        r = CheckpointReader(r_dir, strict=False)
    except CheckpointError as e:
        rep.fail("index", e.msg, e.at)
        rep.row("index", "cannot open")
        return None
    for p in r.problems:
        rep.fail("index", p.msg, p.at)
    man = load_manifest(r_dir)
    verified = 0
    if man:
        for shard, rec in (man.get("shards") or {}).items():
            path = r_dir / shard
            if not path.exists():
                rep.fail("index", f"manifest lists {shard}, which is missing", str(path))
            elif not matches(path, rec):
                rep.fail("index", f"{shard} does not match its manifest sha256 digest", str(path))
            else:
                verified += 1
    rep.row("index", f"{len(r.names())} tensors in {len(r.shards())} shard(s)"
            + (f", {verified} sha256 verified" if man else ", no manifest"))
    return r


def _ignore_list(config: dict) -> list[str] | None:
    qc = config.get("quantization_config") or {}
    for key in ("ignore", "exclude_modules"):
        if isinstance(qc.get(key), list):
            return [str(x) for x in qc[key]]
    return None


def _ignored(mod: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            import re

            if re.match(p[3:], mod):
                return True
        elif fnmatch.fnmatchcase(mod, p):
            return True
    return False


def _check_layout(r: CheckpointReader, rep: _Report, nv: list[str], fp8: list[str]) -> None:
    for base in nv:
        w = base + ".weight" if base + ".weight" in r else base + ".weight_packed"
        if w not in r or base + ".weight_scale" not in r:
            rep.fail("layout", f"{base}: NVFP4 module lacks its packed weight or weight_scale", base)
            continue
        pm, sm = r.meta(w), r.meta(base + ".weight_scale")
        s2n = base + ".weight_scale_2" if base + ".weight_scale_2" in r else base + ".weight_global_scale"
        s2m = r.meta(s2n)
        if pm.dtype_name != "U8" or len(pm.shape) != 2 or pm.shape[1] % 8:
            rep.fail("layout", f"{w}: expected uint8 [out, 8k], got {pm.dtype_name}{list(pm.shape)}", w)
        elif sm.dtype_name != "F8_E4M3" or sm.shape != (pm.shape[0], pm.shape[1] * 2 // 16):
            rep.fail("layout", f"{base}.weight_scale: expected F8_E4M3{[pm.shape[0], pm.shape[1] // 8]}, "
                     f"got {sm.dtype_name}{list(sm.shape)}", base + ".weight_scale")
        if s2m.dtype_name != "F32" or math.prod(s2m.shape) != 1:
            rep.fail("layout", f"{s2n}: expected one float32, got {s2m.dtype_name}{list(s2m.shape)}", s2n)
    for base in fp8:
        sc = next((s for s in (base + ".weight_scale_inv", base + ".scale") if s in r), None)
        if sc is None:
            rep.fail("layout", f"{base}.weight is FP8 without a scale companion", base + ".weight")
            continue
        wm, smeta = r.meta(base + ".weight"), r.meta(sc)
        if smeta.shape != scale_grid(wm.shape) and len(smeta.shape) == 2:
            try:
                infer_block(wm.shape, smeta.shape)
            except Exception:  # noqa: BLE001
                rep.fail("layout", f"{sc}: shape {list(smeta.shape)} does not tile {list(wm.shape)}", sc)
    ignore = _ignore_list(r.config)
    if ignore is not None and (nv or fp8):
        quantized = set(nv) | set(fp8)
        for base in sorted(quantized):
            if _ignored(base, ignore):
                rep.fail("layout", f"{base} is quantized but listed in the ignore/exclude list", base)
        for n in r.names():
            if n.endswith(".weight") and r.meta(n).dtype_name in FLOATS and len(r.meta(n).shape) == 2:
                base = n[: -len(".weight")]
                if base not in quantized and not _ignored(base, ignore) and "norm" not in base:
                    rep.fail("layout", f"{base} is kept unquantized but missing from the ignore/exclude list", n)
    rep.row("layout", f"{len(nv)} NVFP4 and {len(fp8)} FP8-block modules"
            + ("" if ignore is None else f", ignore list of {len(ignore)}"))


def _check_scales_and_decode(r: CheckpointReader, rep: _Report, nv: list[str], fp8: list[str], layout,
                             progress: Progress) -> None:
    group_s2: dict[str, tuple[float, str]] = {}
    for base in nv:
        try:
            s2n = base + ".weight_scale_2" if base + ".weight_scale_2" in r else base + ".weight_global_scale"
            s2 = r.get(s2n).float().reshape(-1)[0]
            if not bool(torch.isfinite(s2)) or float(s2) <= 0:
                rep.fail("scales", f"{s2n} is {float(s2)}: must be finite and > 0", s2n)
                continue
            bs = r.get(base + ".weight_scale").float()
            if not bool(torch.isfinite(bs).all()) or bool((bs <= 0).any()):
                bad = int((~torch.isfinite(bs) | (bs <= 0)).sum())
                rep.fail("scales", f"{base}.weight_scale has {bad} block scale(s) that are not finite and > 0",
                         base + ".weight_scale")
            s2v = float(s2) if s2n.endswith("_scale_2") else 1.0 / float(s2)
            key = layout.classify(base + ".weight", quantize_attention=True).fused_group if layout else None
            if key:
                if key in group_s2 and group_s2[key][0] != s2v:
                    rep.fail("scales", f"{base} and {group_s2[key][1]} are one fused group but have global scales "
                             f"{s2v!r} and {group_s2[key][0]!r}", s2n)
                group_s2.setdefault(key, (s2v, base))
            vals = decode_module(r, base)
            if not bool(torch.isfinite(vals).all()):
                rep.fail("decode", f"{base} decodes to non-finite values", base)
        except Exception as e:  # noqa: BLE001 - a broken tensor is a finding, not a crash
            rep.fail("decode", f"{base}: cannot decode ({e})", base)
        progress.advance(1, label=base)
    for base in fp8:
        sc = next((s for s in (base + ".weight_scale_inv", base + ".scale") if s in r), None)
        if sc is None:
            continue
        s = r.get(sc)
        sf = s.float() if s.dtype != torch.float8_e8m0fnu else s.float()
        if not bool(torch.isfinite(sf).all()) or bool((sf <= 0).any()):
            rep.fail("scales", f"{sc} holds scales that are not finite and > 0", sc)
        try:
            if not bool(torch.isfinite(decode_module(r, base)).all()):
                rep.fail("decode", f"{base} decodes to non-finite values", base)
        except Exception as e:  # noqa: BLE001
            rep.fail("decode", f"{base}: cannot decode ({e})", base)
        progress.advance(1, label=base)
    n_float = 0
    for n in r.names():
        if r.meta(n).dtype_name in FLOATS:
            n_float += 1
            if not bool(torch.isfinite(r.get(n).float()).all()):
                rep.fail("decode", f"{n} holds NaN or Inf", n)
    rep.row("scales", f"{len(nv) + len(fp8)} scale sets, {len(group_s2)} fused groups share their global scale")
    rep.row("decode", f"{len(nv) + len(fp8)} quantized modules decode, {n_float} float tensors finite")


def validate_checkpoint(directory: str | os.PathLike, against: str | os.PathLike | None = None, *,
                        amax: str | os.PathLike | None = None, device: str = "cpu",
                        sink: EventSink = NullSink(), amax_model: str | os.PathLike | None = None) -> dict[str, Any]:
    """Validate `directory`; returns the report dict (`ok`, `checks`, `failures`, `tensors`). With `amax`, the
    snapshot is checked against `amax_model` (default: `against`, else `directory`)."""
    directory = Path(directory)
    rep = _Report(directory)
    r = _check_index(directory, rep)
    target = "none"
    if r is not None:
        from engine.models import detect_layout

        try:
            layout = detect_layout(r.config, r.names())
        except Exception:  # noqa: BLE001
            layout = None
        nv, fp8 = _nvfp4_bases(r.names()), _fp8_bases(r)
        target = "nvfp4" if nv else "fp8-block" if fp8 else "bf16"
        progress = Progress(sink, "modules", total=(len(nv) + len(fp8)) * (2 if against else 1))
        _check_layout(r, rep, nv, fp8)
        _check_scales_and_decode(r, rep, nv, fp8, layout, progress)
        labels = label_problems(directory, r.config, set(r.names()), nv, fp8)  # after the tensors: theirs come first
        for msg, at in labels:
            rep.fail("config", msg, at)
        rep.row("config", "labels agree with the tensors" if not labels else f"{len(labels)} disagreement(s)")
        if against is not None:
            try:
                src = CheckpointReader(against)
            except CheckpointError as e:
                rep.fail("source", e.msg, e.at)
                src = None
            from engine.convert.validate_source import check_source

            if src is not None and check_source(r, src, rep, nv, fp8, progress):
                rep.skip("block", "not run: tensor shapes differ from the source's")
            elif src is not None:
                from engine.convert.block_check import check_first_block

                check_first_block(r, src, rep, target, device)
        else:
            rep.skip("source", "no --against source given")
    if amax is not None:
        _check_amax(directory, amax, rep,
                    model_dir=amax_model if amax_model is not None else against if against is not None else directory)
    ok = not rep.failures
    sink.emit("log", level="info" if ok else "error",
              msg=f"validate {directory}: {'ok' if ok else f'{len(rep.failures)} failure(s)'}")
    return {"dir": str(directory), "against": str(against) if against else None, "format": target, "ok": ok,
            "checks": rep.checks, "failures": rep.failures, "tensors": rep.tensors}


def _check_amax(directory: Path, amax: str | os.PathLike, rep: _Report, model_dir: str | os.PathLike) -> None:
    """`--amax`: the calibration's own check (engine.calibrate.validate.validate_amax) against the model's layers."""
    from engine.calibrate.validate import validate_amax

    res = validate_amax(amax, model_dir=model_dir)
    for p in res.get("problems", []):
        rep.fail("amax", str(p), str(amax))
    rep.row("amax", f"snapshot {amax}: {res.get('quantizers', 0)} quantizers")


def format_report(report: dict[str, Any]) -> str:
    """The human summary table."""
    lines = [f"validate {report['dir']}" + (f" against {report['against']}" if report.get("against") else "")
             + f"  [{report['format']}]", f"{'check':<8} {'status':<8} detail"]
    for c in report["checks"]:
        lines.append(f"{c['check']:<8} {c['status']:<8} {c['detail']}")
    if report["tensors"]:
        worst = sorted(report["tensors"], key=lambda t: -t["rel_err"])[:5]
        lines.append("worst tensors vs source:")
        for t in worst:
            lines.append(f"  {t['tensor']:<60} rel {t['rel_err']:.4f}  SNR {t['snr_db']:.1f} dB")
    for f in report["failures"][:20]:
        lines.append(f"FAIL {f['check']}: {f['msg']}")
    if len(report["failures"]) > 20:
        lines.append(f"... and {len(report['failures']) - 20} more failure(s)")
    lines.append("OK" if report["ok"] else f"FAILED ({len(report['failures'])})")
    return "\n".join(lines)
