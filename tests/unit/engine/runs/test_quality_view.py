"""The quality figures of a run view: eval's from its result, and from its report file after a failed gate."""

from __future__ import annotations

import json

from engine.core.names import StageName, StageState
from engine.runs.figures import QualityReader
from engine.runs.runview import StageView


def test_a_failed_gate_shows_the_figures_of_its_report(tmp_path):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"kld_mean": 0.25, "kld_p99": 1.5, "top1_agree": 0.62, "verdict": "fail"}))
    stages = [StageView(StageName.VALIDATE, StageState.SUCCEEDED, result={"worst_tensor": "w", "worst_rel_err": 0.1}),
              StageView(StageName.EVAL, StageState.FAILED)]
    q = QualityReader().view(stages, None, str(report))
    assert (q.kld_mean, q.kld_p99, q.top1_agree) == (0.25, 1.5, 0.62)


def test_a_passed_gate_reads_its_result_and_non_finite_figures_are_none(tmp_path):
    stages = [StageView(StageName.EVAL, StageState.SUCCEEDED,
                        result={"kld_mean": 0.01, "kld_p99": float("nan"), "top1_agree": 0.97})]
    q = QualityReader().view(stages, None, str(tmp_path / "absent.json"))
    assert (q.kld_mean, q.kld_p99, q.top1_agree) == (0.01, None, 0.97)
    running = [StageView(StageName.EVAL, StageState.RUNNING)]
    assert QualityReader().view(running, None, None).kld_mean is None
