"""A stage whose worker went silent is shown as stalled, and a run is resumed right after its worker's kill -9.

Real processes only: the `quantdeck` CLI, its detached driver and workers on a tiny checkpoint. The worker is held
at the worker's documented test pause point, then stopped with SIGSTOP: `quantdeck status --json` gives the stage
`stalled` with `silent_s` and the quiet rank's pid, `quantdeck run` (following) prints it, and the attempt ends
with the root cause `stalled` once the stopped worker is killed. A resume started at once after a kill -9 never
answers "already held": it waits for the driver to notice the death (a few seconds at most), saying what it waits
for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.integration.runs_support import (
    REPO,
    env,
    pause,
    qd,
    run_dir,
    run_id_of,
    status,
    wait_driver_done,
    wait_for,
    wait_paused,
    write_recipe,
)


def _status_json(rid: str) -> dict:
    r = qd("status", rid, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _stage(view: dict, name: str) -> dict:
    return next(s for s in view["stages"] if s["name"] == name)


@pytest.mark.slow
def test_a_stopped_worker_is_shown_stalled_then_its_kill_is_recorded_as_stalled(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8")
    work = tmp_path / "work"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, tmp_path / "out").read_text()
    recipe = recipe.replace('device = "cpu"\n', 'device = "cpu"\nstall_after_s = 2\n')
    (tmp_path / "recipe.toml").write_text(recipe)
    # followed in the foreground, as an operator runs it
    fg = subprocess.Popen([sys.executable, "-m", "console.cli", "run", str(tmp_path / "recipe.toml")], cwd=REPO,
                          env=env(**pause("inspect", 0)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        rid = fg.stdout.readline().split()[1]
        wait_paused(work, rid, "inspect")
        pid = int(status(work, rid, "inspect")["pid"])
        os.kill(pid, signal.SIGSTOP)

        view = wait_for(lambda: (v := _status_json(rid)) and _stage(v, "inspect")["stalled"] and v, 60,
                        "inspect to show as stalled")
        st = _stage(view, "inspect")
        assert st["state"] == "RUNNING" and st["silent_s"] >= 2
        assert [(q["rank"], q["pid"]) for q in st["quiet_ranks"]] == [(0, pid)] and st["quiet_ranks"][0]["host"]
        text = qd("status", rid).stdout
        assert "STALLED: no event for" in text and f"rank 0 (pid {pid} on" in text, text
        # the driver saw it too (it records a later death as the stall's)
        wait_for(lambda: "stage inspect stalled" in (run_dir(work, rid) / "driver.log").read_text(), 30,
                 "the driver to log the stall")

        os.kill(pid, signal.SIGKILL)
        wait_driver_done(work, rid)
        _, err = fg.communicate(timeout=60)
        assert "[inspect] STALLED: no event for" in err and f"rank 0 (pid {pid} on" in err, err
        st = status(work, rid, "inspect")
        assert st["state"] == "FAILED_WORKER" and st["error_class"] == "stalled", st
        assert "stalled: no event for" in st["error"] and "SIGKILL" in st["error"] and "resume" in st["hint"]
    finally:
        if fg.poll() is None:
            os.killpg(fg.pid, signal.SIGKILL)
            fg.wait()
    h = json.loads(qd("history", rid, "--json").stdout)
    assert [(a["stage"], a["error_class"]) for a in h if a["stage"] == "inspect"] == [("inspect", "stalled")]


@pytest.mark.slow
def test_resume_right_after_a_kill_minus_9_waits_for_the_driver_then_goes_on(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8")
    work = tmp_path / "work"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, tmp_path / "out")
    rid = run_id_of(qd("run", recipe, "--detach", **pause("inspect", 0)))
    wait_paused(work, rid, "inspect")
    pid = int(status(work, rid, "inspect")["pid"])
    driver = json.loads((run_dir(work, rid) / "driver.json").read_text())["pid"]
    # the driver is slow to notice the death (held with SIGSTOP, as on a loaded machine): resume must wait for it
    os.kill(driver, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGKILL)
        res = subprocess.Popen([sys.executable, "-m", "console.cli", "resume", rid, "--detach"], cwd=REPO,
                               env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = res.stderr.readline()
        assert first.startswith("quantdeck: waiting for the driver of run"), first + res.stderr.read()
        assert f"(pid {driver} on" in first and f"worker pid {pid} of stage inspect" in first, first
    finally:
        os.kill(driver, signal.SIGCONT)
    out, err = res.communicate(timeout=60)
    assert res.returncode == 0 and out.split()[:2] == ["run", rid], first + err
    assert "already held" not in err, err
    wait_driver_done(work, rid)
    st = status(work, rid, "inspect")
    assert st["attempt"] == 2 and st["state"] == "SUCCEEDED", st
    assert st["attempts"][0]["error_class"] == "killed" and st["attempts"][0]["pid"] == pid
    assert json.loads(qd("status", rid, "--json").stdout)["result"] == "SUCCEEDED"
