"""Plans: stages by target, resolved params, modes."""

from __future__ import annotations

import pytest

from engine.core.errors import RunError
from engine.runs.plan import Plan, build_plan, stages_to_run
from engine.runs.recipe import loads_recipe


def _plan(extra: str = "", source: str = "/ckpt/DeepSeek-V3") -> Plan:
    r = loads_recipe(f'[run]\nworkdir = "work"\n[source]\npath = "{source}"\n{extra}')
    return build_plan(r, run_id="r1", run_dir="/w/runs/r1", base="/home/op")


def test_weight_only_nvfp4_uses_convert():
    p = _plan()
    assert p.names() == ["inspect", "convert", "inject-mtp", "copy-extras", "validate"]
    conv = p.stage("convert").params
    assert conv["src"] == "/ckpt/DeepSeek-V3" and conv["to"] == "nvfp4"
    assert conv["dst"] == "/home/op/work/outputs/DeepSeek-V3-nvfp4" == p.output
    assert conv["inputs"] == {"src": "/ckpt/DeepSeek-V3"} and conv["outputs"] == {"dst": p.output}


@pytest.mark.parametrize("fmt, middle", [("bf16", ["dequant"]), ("fp8-block", ["cast-fp8"])])
def test_other_targets(fmt, middle):
    p = _plan(f'[target]\nformat = "{fmt}"')
    assert p.names()[1:-3] == middle
    assert p.stage(middle[0]).params["to"] == fmt


def test_calibrated_s3_push_plan():
    p = _plan('[target]\ncalibrate = true\nlayouts = ["modelopt", "compressed-tensors"]\n'
              '[calibration]\nsamples = "s.json"\nnum_samples = 4\n[push]\ntarget = "s3://b/out"\n',
              source="s3://bkt/models/V3")
    assert p.names() == ["pull", "inspect", "calibrate", "export", "inject-mtp", "copy-extras", "validate", "eval",
                         "push"]
    assert p.stage("pull").params["dst"] == "/home/op/work/sources/bkt/models/V3" == p.source
    cal = p.stage("calibrate")
    assert cal.distributed and cal.params["samples"] == "/home/op/s.json" and cal.params["num_samples"] == 4
    assert p.stage("export").params["amax"] == cal.params["amax"] == "/w/runs/r1/amax"
    assert p.stage("push").params["src"] == p.output and p.stage("push").params["part_size"] == 64 << 20
    assert p.stage("validate").params["layouts"] == ["modelopt", "compressed-tensors"]


def test_plan_json_round_trip():
    p = _plan()
    assert Plan.from_json(p.to_json()) == p


def test_modes():
    p = _plan('[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"')
    done = {"inspect": "SUCCEEDED", "calibrate": "SUCCEEDED", "export": "FAILED"}
    assert stages_to_run(p, done, "resume") == ["export", "inject-mtp", "copy-extras", "validate", "eval"]
    allok = {n: "SUCCEEDED" for n in p.names()}
    assert stages_to_run(p, allok, "resume") == []
    assert stages_to_run(p, allok, "export-only") == ["export", "inject-mtp", "copy-extras", "validate", "eval"]
    assert stages_to_run(p, {}, "validate-only") == []
    with pytest.raises(RunError, match="calibrate is not done"):
        stages_to_run(p, {"inspect": "SUCCEEDED", "calibrate": "FAILED_WORKER"}, "export-only")
    with pytest.raises(RunError, match="no export stage"):
        stages_to_run(_plan(), {}, "export-only")
    with pytest.raises(RunError, match="unknown mode"):
        stages_to_run(p, {}, "sideways")
