"""The eval stage in plans: where it sits, when it is on, and where its held-out samples come from."""

from __future__ import annotations

import json

import pytest

from engine.core.errors import RecipeError
from engine.runs.plan import Plan, build_plan
from engine.runs.recipe import loads_recipe


def _plan(extra: str, tmp_path) -> Plan:
    r = loads_recipe(f'[run]\nworkdir = "work"\n[source]\npath = "/ckpt/DeepSeek-V3"\n{extra}')
    return build_plan(r, run_id="r1", run_dir="/w/runs/r1", base=tmp_path)


def _samples(tmp_path, n: int, name: str = "s.json"):
    f = tmp_path / name
    f.write_text(json.dumps([f"sample {i}" for i in range(n)]))
    return f


@pytest.mark.parametrize("target", ['format = "nvfp4"', 'format = "fp8-block"', 'calibrate = true'])
def test_eval_sits_between_validate_and_push(tmp_path, target):
    _samples(tmp_path, 20)
    p = _plan(f'[target]\n{target}\n[calibration]\nsamples = "s.json"\nnum_samples = 4\n'
              '[push]\ntarget = "s3://b/out"\n', tmp_path)
    assert p.names()[-3:] == ["validate", "eval", "push"]
    ev = p.stage("eval").params
    assert ev["dst"] == p.output and ev["src"] == p.source
    assert ev["samples"] == str(tmp_path / "s.json") and ev["skip"] == 4  # after the samples calibrated on
    assert (ev["num_samples"], ev["seq_len"], ev["max_kld_mean"], ev["min_top1"]) == (16, 512, 0.1, 0.9)
    assert ev["report"] == "/w/runs/r1/stages/eval/report.json"


def test_eval_off_when_disabled_or_bf16_or_without_samples(tmp_path):
    _samples(tmp_path, 20)
    assert "eval" not in _plan('[calibration]\nsamples = "s.json"\nnum_samples = 4\n[eval]\nenable = false',
                               tmp_path).names()
    assert "eval" not in _plan('[target]\nformat = "bf16"\n[calibration]\nsamples = "s.json"\nnum_samples = 4',
                               tmp_path).names()
    assert "eval" not in _plan("", tmp_path).names()  # weight-only without any samples file: nothing to gate on
    with pytest.raises(RecipeError, match="eval.samples") as e:
        _plan("[eval]\nenable = true", tmp_path)
    assert "calibration.samples" in e.value.msg


def test_eval_options_and_own_samples_file(tmp_path):
    _samples(tmp_path, 20)
    _samples(tmp_path, 3, "held.json")
    p = _plan('[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 4\n'
              '[eval]\nsamples = "held.json"\nnum_samples = 2\nseq_len = 64\nmax_kld_mean = 0\nmin_top1 = 1.01\n'
              'device = "cpu"', tmp_path)
    ev = p.stage("eval").params
    assert ev["samples"] == str(tmp_path / "held.json") and ev["skip"] == 0
    assert (ev["num_samples"], ev["seq_len"], ev["max_kld_mean"], ev["min_top1"], ev["device"]) == \
        (2, 64, 0.0, 1.01, "cpu")


def test_eval_samples_overlapping_calibration_are_refused(tmp_path):
    _samples(tmp_path, 20)
    with pytest.raises(RecipeError, match="eval.skip = 2 would evaluate on samples calibrated on") as e:
        _plan('[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 4\n'
              '[eval]\nsamples = "s.json"\nskip = 2', tmp_path)
    assert e.value.at.endswith("eval.skip") and "calibration.num_samples = 4" in e.value.msg


def test_no_held_out_sample_is_refused_naming_the_keys(tmp_path):
    _samples(tmp_path, 8)
    with pytest.raises(RecipeError, match="no held-out sample") as e:
        _plan('[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 8', tmp_path)
    assert "calibration.samples" in e.value.msg and "calibration.num_samples = 8" in e.value.msg
    assert "eval.samples" in e.value.hint and "eval.enable = false" in e.value.hint
    assert "eval" not in _plan('[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 8\n'
                               '[eval]\nenable = false', tmp_path).names()
