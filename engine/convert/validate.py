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
              decoder-layer class, matches the source layer within block_tol (engine.convert.validate_ref)
Warnings (`warnings`, never a failure) name what a loader gets wrong with a valid checkpoint
(engine.convert.validate_loaders): routed experts of a compressed-tensors NVFP4 MoE that transformers loads as
their packed bytes.

How: the output is read once, every tensor whole, on a pool of threads that hash each piece for the manifest
digest as it arrives and check and decode it with numpy (engine.convert.validate_read); of the source only the
sampled rows and the kept tensors are read. The decoder-block check imports torch and transformers, seconds of a
short run: where this process has not imported transformers yet, it runs in a child process started first, beside
the rest (in a local run, one the driver started before validate: engine.convert.block_child.start_warm), and the
pass's threads give way to it (QUANTDECK_VALIDATE_NICE): on a small machine that child, not the pass, ends validate.
Its default, 10, measured on 2 cores (mid-cpu checkpoint, three rounds each, data evicted / in the page cache): nice
0 3.76-3.96 / 3.70-3.88 s; 5: 3.44-3.82 / 3.37-3.39 s; 10: 3.17-3.60 / 3.20-3.43 s; 19: 3.35-3.91 / 3.24-3.37 s.
A module the host path does not decode goes through the torch reference (engine.convert.validate_ref).
"""

from __future__ import annotations

import fnmatch
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.checkpoint.manifest import load_manifest
from engine.checkpoint.reader import CheckpointReader
from engine.convert import validate_read as host
from engine.convert.block_child import start_first_block
from engine.convert.validate_config import label_problems
from engine.convert.validate_loaders import loader_warnings
from engine.convert.validate_modules import emit_scales_and_decode, stored_name
from engine.convert.validate_pass import Earlier, Pass, has_digests, plan_pass, source_key
from engine.convert.validate_source import emit_source
from engine.core.errors import CheckpointError
from engine.core.events import EventSink, NullSink, Progress
from engine.core.settings import settings
from engine.formats.grid import infer_block, scale_grid
from engine.models import detect_layout

SAMPLE_ROWS = host.SAMPLE_ROWS
FLOATS = host.FLOAT_DTYPES


class _Report:
    def __init__(self, directory: Path):
        self.checks: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self.tensors: list[dict[str, Any]] = []
        self.dir = directory
        self.target = "none"

    def fail(self, check: str, msg: str, at: str | None = None) -> None:
        self.failures.append({"check": check, "msg": msg, "at": at})

    def warn(self, check: str, msg: str, at: str | None, hint: str) -> None:
        self.warnings.append({"check": check, "msg": msg, "at": at, "hint": hint})

    def row(self, check: str, detail: str) -> None:
        n = sum(1 for f in self.failures if f["check"] == check)
        self.checks.append({"check": check, "status": "FAIL" if n else "ok", "failures": n, "detail": detail})

    def skip(self, check: str, why: str) -> None:
        self.checks.append({"check": check, "status": "skipped", "failures": 0, "detail": why})


def _open_output(r_dir: Path, rep: _Report) -> CheckpointReader | None:
    try:
        return CheckpointReader(r_dir, strict=False)
    except CheckpointError as e:
        rep.fail("index", e.msg, e.at)
        rep.row("index", "cannot open")
        return None


def _check_index(r: CheckpointReader, rep: _Report, man: dict | None, digests: host.Digests,
                 files: host.Files) -> None:
    """The reader's problems, then each shard of the manifest against its digest (recorded as the pass read it)."""
    for p in r.problems:
        rep.fail("index", p.msg, p.at)
    verified = 0
    if man:
        for shard, rec in (man.get("shards") or {}).items():
            path = r.dir / shard
            if not path.exists():
                rep.fail("index", f"manifest lists {shard}, which is missing", str(path))
            elif not digests.matches(path, rec, files):
                rep.fail("index", f"{shard} does not match its manifest sha256 digest", str(path))
            else:
                verified += 1
    rep.row("index", f"{len(r.names())} tensors in {len(r.shards())} shard(s)"
            + (f", {verified} sha256 verified" if man else ", no manifest"))


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
        w = stored_name(r, base, "packed")
        if w not in r or base + ".weight_scale" not in r:
            rep.fail("layout", f"{base}: NVFP4 module lacks its packed weight or weight_scale", base)
            continue
        pm, sm = r.meta(w), r.meta(base + ".weight_scale")
        s2n = stored_name(r, base, "global_scale")
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


def validate_checkpoint(directory: str | os.PathLike, against: str | os.PathLike | None = None, *,
                        amax: str | os.PathLike | None = None, device: str = "cpu",
                        sink: EventSink = NullSink(), amax_model: str | os.PathLike | None = None,
                        block_socket: str | os.PathLike | None = None,
                        earlier: Earlier | None = None) -> dict[str, Any]:
    """Validate `directory`; returns the report dict (`ok`, `checks`, `failures`, `tensors`). With `amax`, the
    snapshot is checked against `amax_model` (default: `against`, else `directory`). `block_socket`: where a run's
    warm decoder-block child may listen (engine.convert.block_child.start_warm); `earlier`: the findings of a pass
    over shards as they were written (engine.convert.validate_follow), taken where the shards are unchanged. The
    report is the same without either."""
    directory = Path(directory)
    rep = _Report(directory)
    amax_job = None
    if amax is not None:  # without a memo in the snapshot, its imports (modelopt: seconds) overlap the tensors' pass
        pool = ThreadPoolExecutor(1, thread_name_prefix="validate-amax")
        amax_job = pool.submit(_amax_check, amax, amax_model if amax_model is not None else
                               against if against is not None else directory)
        pool.shutdown(wait=False)
    r = _open_output(directory, rep)
    target = "none"
    if r is not None:
        _validate_open(r, rep, against, device, sink, block_socket, earlier)
        target = rep.target
    if amax_job is not None:
        _record_amax(amax_job.result(), amax, rep)
    ok = not rep.failures
    sink.emit("log", level="info" if ok else "error",
              msg=f"validate {directory}: {'ok' if ok else f'{len(rep.failures)} failure(s)'}")
    for w in rep.warnings:
        sink.emit("log", level="warning", msg=f"validate {directory}: {w['msg']} (hint: {w['hint']})")
    return {"dir": str(directory), "against": str(against) if against else None, "format": target, "ok": ok,
            "checks": rep.checks, "failures": rep.failures, "warnings": rep.warnings, "tensors": rep.tensors}


def _validate_open(r: CheckpointReader, rep: _Report, against, device: str, sink: EventSink,
                   block_socket: str | os.PathLike | None = None, earlier: Earlier | None = None) -> None:
    try:
        layout = detect_layout(r.config, r.names())
    except Exception:  # noqa: BLE001
        layout = None
    src = src_error = block = None
    if against is not None:
        try:
            src = CheckpointReader(against)
        except CheckpointError as e:
            src_error = e
    plan = plan_pass(r, src)
    nv, fp8, shape_fails, misshapen = plan.nv, plan.fp8, plan.shape_fails, plan.misshapen
    rep.target = "nvfp4" if nv else "fp8-block" if fp8 else "bf16"
    progress = Progress(sink, "modules", total=(len(nv) + len(fp8)) * (2 if against else 1))
    if src is not None and not misshapen:  # started first: it runs beside the pass
        block = start_first_block(r.dir, src.dir, rep.target, device, block_socket=block_socket,
                                  log=lambda msg: sink.emit("log", level="info", msg=msg))
    man = load_manifest(r.dir)
    if earlier is not None and earlier.source != source_key(against):
        earlier = None  # findings made against another source (or none) than this validate's
    run = Pass(r, src, plan, has_digests(man), progress, earlier)
    try:
        run.run(nice=settings().validate_nice if block is not None and block.beside else 0)
        _check_index(r, rep, man, run.digests, run.files)
        _check_layout(r, rep, nv, fp8)
        emit_scales_and_decode(r, rep, nv, fp8, layout, run.events, run.floats)
        labels = label_problems(r.dir, r.config, set(r.names()), nv, fp8)  # after the tensors: theirs come first
        for msg, at in labels:
            rep.fail("config", msg, at)
        rep.row("config", "labels agree with the tensors" if not labels else f"{len(labels)} disagreement(s)")
        for w in loader_warnings(r.dir, r.config, set(r.names()), nv, layout):
            rep.warn("loaders", w.msg, w.at, w.hint)
        if against is None:
            rep.skip("source", "no --against source given")
        elif src is None:
            rep.fail("source", src_error.msg, src_error.at)
        else:
            emit_source(r, src, rep, nv, fp8, shape_fails, misshapen, run.source, run.kept_res)
            if misshapen:
                rep.skip("block", "not run: tensor shapes differ from the source's")
            else:
                block.finish(r, src, rep)
                block = None
    finally:
        run.close()
        if block is not None:
            block.cancel()


def _amax_check(amax: str | os.PathLike, model_dir: str | os.PathLike) -> dict[str, Any]:
    """`--amax`: the calibration's own check (engine.calibrate.validate.validate_amax) against the model's layers."""
    from engine.calibrate.validate import validate_amax

    return validate_amax(amax, model_dir=model_dir)


def _record_amax(res: dict[str, Any], amax: str | os.PathLike, rep: _Report) -> None:
    for p in res.get("problems", []):
        rep.fail("amax", str(p), str(amax))
    how = {"memo": " (expected names: the calibration's memo)", "modelopt": " (expected names: modelopt)"}
    rep.row("amax", f"snapshot {amax}: {res.get('quantizers', 0)} quantizers{how.get(res.get('expected_from'), '')}")


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
    for w in report.get("warnings") or []:
        lines.append(f"WARN {w['check']}: {w['msg']} (hint: {w['hint']})")
    for f in report["failures"][:20]:
        lines.append(f"FAIL {f['check']}: {f['msg']}")
    if len(report["failures"]) > 20:
        lines.append(f"... and {len(report['failures']) - 20} more failure(s)")
    lines.append("OK" if report["ok"] else f"FAILED ({len(report['failures'])})")
    return "\n".join(lines)
