"""eval's verdict against its thresholds, and the report as text for a terminal."""

from __future__ import annotations

import math
from typing import Any

DEFAULT_MAX_KLD_MEAN = 0.1
DEFAULT_MIN_TOP1 = 0.9


def verdict(report: dict[str, Any], max_kld_mean: float = DEFAULT_MAX_KLD_MEAN,
            min_top1: float = DEFAULT_MIN_TOP1) -> dict[str, Any]:
    """{"verdict": "pass" | "fail", "reasons": [...], "thresholds": {...}}: the KLD mean at most `max_kld_mean`,
    top-1 agreement at least `min_top1`, every figure finite."""
    reasons = []
    kld, top1 = report.get("kld_mean"), report.get("top1_agree")
    if not _finite(kld) or not _finite(report.get("kld_max")):
        reasons.append("the KL divergence is not finite (NaN or inf in the output's logits)")
    elif kld > max_kld_mean:
        reasons.append(f"KLD mean {kld:.4g} > {max_kld_mean:g}")
    if not _finite(top1):
        reasons.append("no token was scored")
    elif top1 < min_top1:
        reasons.append(f"top-1 agreement {top1:.4f} < {min_top1:g}")
    return {"verdict": "fail" if reasons else "pass", "reasons": reasons,
            "thresholds": {"max_kld_mean": max_kld_mean, "min_top1": min_top1}}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def format_report(r: dict[str, Any]) -> str:
    lines = [f"eval {r['output']}  against {r['against']}",
             f"samples  {r['num_samples']} from {r['samples']}, {r['tokens']} tokens (seq_len {r['seq_len']}, "
             f"{r['truncated']} truncated) on {r['device']}",
             f"KLD      mean {r['kld_mean']:.5g}  median {r['kld_median']:.5g}  p99 {r['kld_p99']:.5g}  "
             f"max {r['kld_max']:.5g}",
             f"top-1    {r['top1_agree'] * 100:.2f}% agree",
             f"ppl      source {r['ppl_source']:.4f}  output {r['ppl_output']:.4f}  ({r['ppl_tokens']} tokens)",
             "layer    rel. error   own error"]
    worst = r.get("worst_layer")
    for e in r["layers"]:
        mark = "  <- worst" if e["layer"] == worst else ""
        lines.append(f"  {e['layer']:>4}   {e['rel_err']:.4e}   {e['own_err']:.4e}{mark}")
    if r.get("mtp_skipped"):
        lines.append(f"MTP      {', '.join(r['mtp_skipped'])} skipped (no reference forward for them)")
    lines += [f"emulates {note}" for note in r.get("emulates", [])]
    lines += [f"warning  {w}" for w in r.get("warnings", [])]
    th = r["thresholds"]
    if r["verdict"] == "pass":
        lines.append(f"PASS (KLD mean <= {th['max_kld_mean']:g}, top-1 >= {th['min_top1']:g})")
    else:
        lines.append(f"FAIL: {'; '.join(r['reasons'])}; worst layer {worst}")
    return "\n".join(lines)
