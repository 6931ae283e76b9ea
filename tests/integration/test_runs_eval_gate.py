"""The eval stage as the pipeline's quality gate, driven through the real `quantdeck` CLI on a tiny checkpoint: a
weight-only NVFP4 run evaluates its output on the samples held out after the calibration's and shows KLD and top-1
in status and history; an impossible threshold fails the run at eval, with the figures and the worst layer, and
push never runs."""

from __future__ import annotations

import json

import pytest

from tests.integration.runs_support import qd, run_dir, run_id_of, status, write_recipe

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 2, "def f(x):\n    return x * 2  # code",
         "Numbers: 3.14159 2.71828 1.41421", "hello world, a sample of text", "another held-out line of text",
         "the sixth sample, short"]


def _recipe(tmp_path, src, *, gate: str, push: bool = False):
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps(TEXTS))
    work, out = tmp_path / "work", tmp_path / "out"
    extra = (f'[calibration]\nsamples = "{samples}"\nnum_samples = 4\n'
             f'[eval]\nnum_samples = 2\nseq_len = 16\n{gate}\n')
    if push:  # an endpoint nothing listens on: push would fail loudly if it ever ran
        extra += '[push]\ntarget = "s3://bucket/out"\nendpoint_url = "http://127.0.0.1:9"\n'
    return write_recipe(tmp_path / "recipe.toml", src, work, out, extra=extra), work


@pytest.mark.slow
def test_weight_only_run_passes_the_gate_and_shows_its_figures(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    recipe, work = _recipe(tmp_path, src, gate="max_kld_mean = 10.0\nmin_top1 = 0.0")
    r = qd("run", recipe, timeout=600)
    assert r.returncode == 0, r.stderr
    rid = run_id_of(r)
    plan = json.loads((run_dir(work, rid) / "plan.json").read_text())
    assert [s["name"] for s in plan["stages"]][-2:] == ["validate", "eval"]
    ev = status(work, rid, "eval")
    assert ev["state"] == "SUCCEEDED", ev
    res = ev["result"]
    assert res["verdict"] == "pass" and res["num_samples"] == 2 and res["skip"] == 4  # samples 4 and 5 only
    assert res["kld_mean"] >= 0 and 0 <= res["top1_agree"] <= 1 and res["worst_layer"] is not None
    held = (run_dir(work, rid) / "stages" / "eval" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["text"] for x in held] == TEXTS[4:]
    events = (run_dir(work, rid) / "stages" / "eval" / "events.jsonl").read_text()
    assert '"eval.layer"' in events  # progress per layer
    st = json.loads(qd("status", rid, "--json").stdout)
    assert st["kld_mean"] == pytest.approx(res["kld_mean"]) and st["top1_agree"] == pytest.approx(res["top1_agree"])
    text = qd("status", rid).stdout
    assert f"KLD {res['kld_mean']:.4g}" in text and f"top-1 {res['top1_agree'] * 100:.2f}%" in text
    hist = {h["id"]: h for h in json.loads(qd("history", "--json").stdout)}
    assert hist[rid]["kld_mean"] == pytest.approx(res["kld_mean"])
    assert hist[rid]["top1_agree"] == pytest.approx(res["top1_agree"])
    table = qd("history").stdout
    assert "| KLD | Top-1 |" in table and f"{res['top1_agree'] * 100:.2f}%" in table


@pytest.mark.slow
def test_an_impossible_gate_fails_at_eval_and_nothing_is_pushed(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    recipe, work = _recipe(tmp_path, src, gate="min_top1 = 1.01", push=True)
    r = qd("run", recipe, "--no-preflight", timeout=600)
    assert r.returncode == 1, r.stderr
    rid = run_id_of(r)
    ev = status(work, rid, "eval")
    assert ev["state"] == "FAILED" and ev["error_class"] == "quality-gate", ev
    assert "top-1 agreement" in ev["error"] and "< 1.01" in ev["error"] and "KLD mean" in ev["error"]
    assert "worst layer" in ev["error"] and "max_kld_mean / min_top1" in ev["hint"]
    assert status(work, rid, "validate")["state"] == "SUCCEEDED"
    assert status(work, rid, "push")["state"] == "PENDING"  # never started
    report = json.loads((run_dir(work, rid) / "stages" / "eval" / "report.json").read_text())
    assert report["verdict"] == "fail"
    hist = {h["id"]: h for h in json.loads(qd("history", "--json").stdout)}
    assert hist[rid]["result"] == "FAILED" and hist[rid]["root_cause"].startswith("quality-gate")
    assert hist[rid]["top1_agree"] == pytest.approx(report["top1_agree"])  # the failed gate's figures too
    assert "quality-gate" in r.stderr


def test_overlapping_eval_samples_are_refused_before_anything_runs(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps(TEXTS))
    work = tmp_path / "work"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, tmp_path / "out", extra=(
        f'calibrate = true\n[calibration]\nsamples = "{samples}"\nnum_samples = 4\n'
        f'[eval]\nsamples = "{samples}"\nskip = 0\n'))
    r = qd("run", recipe, "--no-preflight")  # refused by the plan itself, as a bad recipe
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "eval.skip = 0 would evaluate on samples calibrated on" in r.stderr
    assert "calibration.num_samples = 4" in r.stderr
    r = qd("run", recipe)  # preflight builds the plan first and says the same
    assert r.returncode != 0 and "would evaluate on samples calibrated on" in r.stderr
    assert not list(work.glob("runs/*/plan.json"))  # no run was planned, so nothing ran
