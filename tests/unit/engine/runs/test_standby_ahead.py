"""Which stages' workers the driver starts ahead as a stage begins (engine.runs.ahead.stages_ahead): the next one, and
after it the light ones (inspect, inject-mtp, copy-extras) that follow and the first stage after them; beside a heavy
stage that last one only on 8 cores or more, where its imports do not slow the heavy one."""

from __future__ import annotations

import pytest

from engine.runs.ahead import stages_ahead
from engine.runs.plan import build_plan, stages_to_run
from engine.runs.recipe import loads_recipe

CALIBRATED = '[target]\ncalibrate = true\n[calibration]\nsamples = "s.json"\nnum_samples = 4\n'


def _todo(extra: str = "") -> list[str]:
    r = loads_recipe(f'[run]\nworkdir = "work"\n[source]\npath = "/ckpt/V3"\n{extra}')
    return stages_to_run(build_plan(r, run_id="r1", run_dir="/w/runs/r1", base="/home/op"), {}, "run")


@pytest.mark.parametrize("cores, extra, stage, ahead", [
    (2, "", "inspect", ["convert"]),
    (2, "", "convert", ["inject-mtp", "copy-extras"]),  # a heavy stage on 2 cores: the light ones, not validate
    (2, "", "inject-mtp", ["copy-extras", "validate"]),  # a light one: through the light ones to the next heavy one
    (2, "", "copy-extras", ["validate"]),
    (2, "", "validate", []),  # the last stage
    (16, "", "convert", ["inject-mtp", "copy-extras", "validate"]),  # cores to spare: the whole chain beside it
    (16, "", "inspect", ["convert"]),
    (2, CALIBRATED, "export", ["inject-mtp", "copy-extras"]),
    (16, CALIBRATED, "export", ["inject-mtp", "copy-extras", "validate"]),
    (16, CALIBRATED, "validate", ["eval"]),
])
def test_the_stages_started_ahead(cores, extra, stage, ahead, monkeypatch):
    monkeypatch.setattr("engine.runs.ahead.os.cpu_count", lambda: cores)
    todo = _todo(extra)
    assert todo[0] == "inspect" and todo[-1] in ("validate", "eval")
    assert stages_ahead(todo, todo.index(stage)) == ahead


def test_a_resume_starts_ahead_from_where_it_begins(monkeypatch):
    monkeypatch.setattr("engine.runs.ahead.os.cpu_count", lambda: 16)
    assert stages_ahead(["copy-extras", "validate"], 0) == ["validate"]
    assert stages_ahead(["inject-mtp", "copy-extras"], 0) == ["copy-extras"]  # a chain that ends with a light stage
