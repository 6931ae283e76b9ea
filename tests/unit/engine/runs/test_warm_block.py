"""Where the driver starts validate's warm decoder-block child (engine.runs.ahead.warm_block_stage): beside the
last stage that writes the output on a machine of 8 cores or more, else beside the first stage after it; before
validate, for the local launcher only, and only when validate has a source to check against."""

from __future__ import annotations

import dataclasses

import pytest

from engine.runs.ahead import warm_block_stage
from engine.runs.plan import Plan, build_plan, stages_to_run
from engine.runs.recipe import loads_recipe
from engine.stages.validate import block_check_args


class _Launcher:
    def __init__(self, name: str = "local"):
        self.name = name


def _plan(extra: str = "") -> Plan:
    r = loads_recipe(f'[run]\nworkdir = "work"\n[source]\npath = "/ckpt/V3"\n{extra}')
    return build_plan(r, run_id="r1", run_dir="/w/runs/r1", base="/home/op")


CALIBRATED = '[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 4\n'


@pytest.mark.parametrize("cores, extra, todo, at", [
    (2, "", None, "inject-mtp"),  # weight-only: inspect, convert, inject-mtp, copy-extras, validate
    (2, '[target]\nformat = "bf16"', None, "inject-mtp"),
    (2, CALIBRATED, None, "inject-mtp"),
    (2, CALIBRATED, "export-only", "inject-mtp"),
    (2, "", ["copy-extras", "validate"], "copy-extras"),  # a resume past inject-mtp
    (2, "", ["validate"], None),  # nothing runs before validate: it starts its own child
    (2, "", ["inspect", "convert"], None),  # no validate to run
    (16, "", None, "convert"),  # cores to spare: beside the stage writing the output
    (16, CALIBRATED, None, "export"),
    (16, CALIBRATED, "export-only", "export"),
    (16, "", ["copy-extras", "validate"], "copy-extras"),
    (16, "", ["validate"], None),
])
def test_where_the_warm_child_starts(cores, extra, todo, at, monkeypatch):
    monkeypatch.setattr("engine.runs.ahead.os.cpu_count", lambda: cores)
    p = _plan(extra)
    if todo is None or isinstance(todo, str):
        todo = stages_to_run(p, {"calibrate": "SUCCEEDED"} if todo else {}, todo or "run")
    assert warm_block_stage(p, todo, _Launcher()) == at


def test_not_for_another_launcher_nor_without_a_source():
    p = _plan()
    todo = stages_to_run(p, {}, "run")
    assert warm_block_stage(p, todo, _Launcher("ssh")) is None
    v = p.stage("validate")
    bare = dataclasses.replace(v, inputs={k: x for k, x in v.inputs.items() if k != "src"})
    p2 = dataclasses.replace(p, stages=tuple(bare if s.name == "validate" else s for s in p.stages))
    assert warm_block_stage(p2, todo, _Launcher()) is None
    assert block_check_args(bare.params) is None


@pytest.mark.parametrize("device, want", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1")])
def test_the_child_is_warmed_for_the_source_and_device_validate_uses(device, want):
    p = _plan()
    params = dict(p.stage("validate").params, device=device)
    assert block_check_args(params) == ("/ckpt/V3", want)
