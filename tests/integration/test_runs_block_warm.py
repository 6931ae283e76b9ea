"""A real local run (the `quantdeck` CLI on a tiny checkpoint): the driver warms validate's decoder-block child up
beside inject-mtp, validate's report comes from it (its log says so) and equals a standalone `quantdeck validate`'s,
and nothing of it is left behind: no process, no socket."""

from __future__ import annotations

import json
import re

from engine.convert.validate import validate_checkpoint
from tests.integration.runs_support import pid_gone, qd, run_dir, run_id_of, status, wait_driver_done, write_recipe


def test_a_local_run_validates_through_the_warm_child(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "bf16")
    work, out = tmp_path / "work", tmp_path / "out"
    r = qd("run", write_recipe(tmp_path / "recipe.toml", src, work, out), timeout=600)
    assert r.returncode == 0, r.stderr
    rid = run_id_of(r)
    wait_driver_done(work, rid)
    rd = run_dir(work, rid)
    assert status(work, rid, "validate")["state"] == "SUCCEEDED"
    warmed = re.search(r"decoder-block check warming up \(pid (\d+)", (rd / "driver.log").read_text())
    assert warmed, (rd / "driver.log").read_text()
    log = (rd / "stages" / "validate" / "log.txt").read_text()
    assert f"answered by the warm child (pid {warmed.group(1)})" in log, log
    assert pid_gone(int(warmed.group(1)))
    assert not (rd / "stages" / "validate" / "block.sock").exists()
    report = json.loads((rd / "stages" / "validate" / "report.json").read_text())[str(out)]
    alone = validate_checkpoint(out, against=src)
    assert report["checks"] == alone["checks"] and report["failures"] == alone["failures"] and report["ok"]
