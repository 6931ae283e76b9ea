"""The eval stage: the quality gate between validate and push. The output runs against its source through the
whole model, layer-streamed (engine.eval.streaming.evaluate, the function `quantdeck eval` calls), on held-out
samples; a KL divergence above `max_kld_mean` or a top-1 agreement below `min_top1` fails the stage with the
figures, the worst layer and a hint, so nothing is pushed.

The held-out slice (samples `skip` … `skip + num_samples` of the plan's samples file) is written to the stage dir
as `samples.jsonl`, so the report names exactly what was evaluated. With several layouts the first is evaluated:
the layouts hold the same codes and scales (validate checks each). Unit: the stage; per-layer progress goes out
as events (`eval.layer` metrics and a progress bar of layers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from engine.calibrate.samples import read_samples_file
from engine.core.errors import QualityGateError, SamplesError
from engine.core.fsutil import atomic_write_bytes, atomic_write_json
from engine.core.names import StageName
from engine.stages._common import output_dirs
from engine.stages.base import Stage, StageContext

SUMMARY_KEYS = ("kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agree", "ppl_source", "ppl_output", "tokens",
                "num_samples", "seq_len", "worst_layer", "verdict", "reasons", "thresholds", "mtp_skipped", "device")


def write_held_out(samples: str, skip: int, num_samples: int, dst: Path) -> int:
    """Write samples `skip` … `skip + num_samples` of `samples` to `dst` (JSONL, text or messages as the file
    holds them); how many. Raises SamplesError when none is left after `skip`."""
    raw = read_samples_file(samples)
    items = raw.items[skip:skip + num_samples]
    if not items:
        raise SamplesError(f"{samples}: holds {len(raw.items)} samples, none after the first {skip} "
                           "(the calibration's)", at=samples,
                           hint="add held-out samples to the file, set [eval] samples to another file, "
                                "or set [eval] enable = false")
    key = "messages" if raw.kind == "jsonl-messages" else "text"
    atomic_write_bytes(dst, "".join(json.dumps({key: x}) + "\n" for x in items).encode())
    return len(items)


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """The figures status.json, the store and the console show (the full report is the stage's report file)."""
    out = {k: report.get(k) for k in SUMMARY_KEYS}
    worst = report.get("worst_layer")
    entry = next((e for e in report.get("layers") or () if e.get("layer") == worst), None)
    out["worst_own_err"] = entry.get("own_err") if entry else None
    return out


def gate_error(report: dict[str, Any], evaluated: str) -> QualityGateError:
    s = summary_of(report)
    figures = (f"KLD mean {_g(s['kld_mean'])} (p99 {_g(s['kld_p99'])}, max {_g(s['kld_max'])}), "
               f"top-1 {_g(s['top1_agree'])}")
    worst = s["worst_layer"]
    where = f"worst layer {worst} (its own error {_g(s['worst_own_err'])})" if worst is not None else "no layer"
    return QualityGateError(
        f"quality gate failed: {'; '.join(report.get('reasons') or ['failed'])}; {figures}; {where}",
        at=f"{evaluated}: layer {worst}" if worst is not None else evaluated,
        hint=f"check layer {worst}'s scales (quantdeck validate --against; quantdeck eval OUT --against SRC shows "
             "every layer); if the thresholds are too strict for this model, set [eval] max_kld_mean / min_top1 "
             "and resume" if worst is not None else "see the stage's report.json")


def _g(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


@Stage.register(StageName.EVAL)
class EvalStage(Stage):
    def run(self, ctx: StageContext) -> dict[str, Any]:
        from engine.eval.streaming import evaluate

        p = ctx.params
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        held = ctx.stage_dir / "samples.jsonl"
        n = write_held_out(p["samples"], int(p.get("skip") or 0), int(p["num_samples"]), held)
        evaluated = str(output_dirs(p["dst"], p.get("layouts"))[0])
        ctx.sink.emit("log", level="info", msg=f"eval: {evaluated} against {p['src']} on {n} held-out sample(s) of "
                      f"{p['samples']} (from sample {int(p.get('skip') or 0)})")
        report = evaluate(evaluated, p["src"], str(held), num_samples=n, seq_len=int(p.get("seq_len") or 512),
                          batch_size=int(p.get("batch_size") or 1), device=p.get("device") or "auto",
                          max_kld_mean=float(p["max_kld_mean"]), min_top1=float(p["min_top1"]), sink=ctx.sink,
                          state_dir=ctx.stage_dir / "resume")  # a killed eval resumes at the layer it was on
        shutil.rmtree(ctx.stage_dir / "resume", ignore_errors=True)  # the report holds what it was for
        report.update({"samples_file": p["samples"], "skip": int(p.get("skip") or 0)})
        if p.get("report"):
            atomic_write_json(p["report"], report)
        if report.get("verdict") != "pass":
            raise gate_error(report, evaluated)
        return {**summary_of(report), "evaluated": evaluated, "samples_file": p["samples"],
                "skip": int(p.get("skip") or 0)}

