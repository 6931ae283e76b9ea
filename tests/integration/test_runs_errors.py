"""Clear errors, nothing lost: bad recipes, a missing source, a full destination (a real small tmpfs), a
second `run` on a live run, cancel. Real processes: the `quantdeck` CLI, detached driver and workers."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.runs_support import (
    REPO,
    env,
    pause,
    pid_gone,
    qd,
    run_dir,
    run_id_of,
    status,
    tree_state,
    wait_driver_done,
    wait_paused,
    write_recipe,
)


def _cli(capsys, *args) -> tuple[int, str, str]:
    """The real `quantdeck` entry point, in process (nothing here starts a worker)."""
    from console.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_bad_recipes_fail_at_load_naming_file_and_key(tmp_path, capsys):
    work = tmp_path / "work"
    cases = {
        'format = "nvfp5"': "target.format: got 'nvfp5'",
        'layouts = ["modelopt", "gguf"]': "target.layouts[1]",
        'calibrate = true': "calibration.samples: required when target.calibrate = true",
        'shard_mb = -1': "target.shard_mb",
        'colour = "blue"': "target.colour: unknown key",
    }
    for i, (line, words) in enumerate(cases.items()):
        p = tmp_path / f"bad{i}.toml"
        p.write_text(f'[run]\nworkdir = "{work}"\n[source]\npath = "{tmp_path}"\n[target]\n{line}\n')
        for cmd in ("run", "preflight"):
            code, out, err = _cli(capsys, cmd, p)
            assert code == 3, (cmd, err)
            assert err.startswith(f"quantdeck: error: bad{i}.toml: {words}"), err
            assert out == ""
    assert not work.exists()  # nothing was created
    r = qd("run", tmp_path / "bad0.toml")  # and the same from a fresh interpreter, as a new user types it
    assert r.returncode == 3 and r.stderr.startswith("quantdeck: error: bad0.toml: target.format")


def test_init_writes_a_recipe_that_loads(tmp_path, capsys):
    code, out, _ = _cli(capsys, "init", "--family", "deepseek-v4")
    assert code == 0
    p = tmp_path / "recipe.toml"
    p.write_text(out)
    code, out, err = _cli(capsys, "preflight", p)  # loads; the placeholder source is what fails
    assert code == 5 and "source /path/to/checkpoint does not exist" in out, out + err


def test_missing_source_fails_preflight_before_anything_starts(tmp_path, capsys):
    work = tmp_path / "work"
    recipe = write_recipe(tmp_path / "r.toml", tmp_path / "nowhere", work, tmp_path / "out")
    code, out, err = _cli(capsys, "run", recipe)
    assert code == 5, err
    assert "nowhere does not exist" in err and "fix:" in err and out == ""
    assert not (work / "runs").exists()
    code, out, err = _cli(capsys, "preflight", recipe)
    assert code == 5
    assert out.strip().splitlines() == [
        f"source {tmp_path / 'nowhere'} does not exist (fix: set source.path to the checkpoint directory)"]


@pytest.fixture
def small_fs(tmp_path):
    """A real 256 KiB tmpfs (we are root in the test environment)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        yield None  # cannot mount: the test falls back to a real RLIMIT_FSIZE limit
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_full_destination(tmp_path, tiny_ckpt, small_fs):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    work = tmp_path / "work"
    out = (small_fs or tmp_path) / "out"
    recipe = write_recipe(tmp_path / "r.toml", src, work, out)
    src_before = tree_state(src)
    preexec = None
    if small_fs is not None:
        r = qd("run", recipe)  # preflight (automatic) sees the small filesystem
        assert r.returncode == 5, r.stdout + r.stderr
        assert f"disk: {out} needs" in r.stderr and "free" in r.stderr and "fix:" in r.stderr
        assert not (work / "runs").exists()
    else:
        def preexec():  # the kernel refuses writes past 200 KiB (EFBIG), inherited by driver and workers
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (200 << 10, 200 << 10))
    # forced past preflight, the writer meets the real full filesystem
    proc = subprocess.run([sys.executable, "-m", "console.cli", "run", str(recipe), "--no-preflight"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=180, preexec_fn=preexec)
    assert proc.returncode == 1, proc.stderr
    rid = run_id_of(proc)
    st = status(work, rid, "convert")
    assert st["state"] == "FAILED" and st["error_class"] == "disk-full", st
    assert "resume" in st["hint"]
    assert status(work, rid, "inspect")["state"] == "SUCCEEDED"  # kept
    assert "convert: FAILED: disk-full" in proc.stderr
    row = next(x for x in json.loads(qd("history", "--json").stdout) if x["id"] == rid)
    assert row["result"] == "FAILED" and row["root_cause"].startswith("disk-full")
    assert tree_state(src) == src_before  # the source is untouched


@pytest.mark.slow
def test_second_run_on_a_live_run_is_refused_then_cancel(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    work = tmp_path / "work"
    recipe = write_recipe(tmp_path / "r.toml", src, work, tmp_path / "out")
    r = qd("run", recipe, "--detach", **pause("inspect", 0))
    assert r.returncode == 0, r.stderr
    rid = run_id_of(r)
    wait_paused(work, rid, "inspect")
    rd = run_dir(work, rid)
    live = status(work, rid, "inspect")
    assert live["state"] == "RUNNING"

    again = qd("run", recipe, "--no-preflight")
    assert again.returncode == 7, again.stderr
    assert f"output {tmp_path / 'out'} is already held by pid" in again.stderr and "hint:" in again.stderr
    assert len(list((work / "runs").iterdir())) == 1  # no second run dir

    res = qd("resume", rid)
    assert res.returncode == 7 and f"run {rid} is already held by pid" in res.stderr, res.stderr
    wk = subprocess.run([sys.executable, "-m", "engine.runs.worker", "inspect", "--run-dir", str(rd)], cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=60)
    assert wk.returncode == 7 and f"stage inspect of run {rid} is already held by pid {live['pid']}" in wk.stderr
    assert status(work, rid, "inspect") == live  # nothing changed

    st = json.loads(qd("status", rid, "--json").stdout)
    assert st["result"] == "RUNNING" and st["stages"][0]["pid"] == live["pid"]

    # the driver dies (kill -9): its worker goes on; resume re-attaches to it instead of starting another
    drv = json.loads((rd / "driver.json").read_text())["pid"]
    os.kill(drv, signal.SIGKILL)
    wait_driver_done(work, rid, 30)
    assert status(work, rid, "inspect")["state"] == "RUNNING" and not pid_gone(live["pid"])
    r = qd("resume", rid, "--detach")
    assert r.returncode == 0, r.stderr
    new_drv = json.loads((rd / "driver.json").read_text())["pid"]
    time.sleep(2)
    assert new_drv != drv and not pid_gone(new_drv), (rd / "driver.log").read_text()  # waiting on the worker
    assert status(work, rid, "inspect")["attempt"] == 1  # the same attempt, adopted

    c = qd("cancel", rid)
    assert c.returncode == 0 and "inspect" in c.stderr, c.stderr
    wait_driver_done(work, rid, 30)
    assert pid_gone(live["pid"])
    st = status(work, rid, "inspect")
    assert st["state"] == "CANCELLED" and st["error_class"] == "interrupted" and st["ended_at"]
    assert all(status(work, rid, s)["state"] == "PENDING" for s in ("convert", "validate"))
    row = next(x for x in json.loads(qd("history", "--json").stdout) if x["id"] == rid)
    assert row["result"] == "CANCELLED" and row["root_cause"].startswith("interrupted")
    n = qd("note", rid, "cancelled on purpose")
    assert n.returncode == 0
    assert "cancelled on purpose" in qd("history").stdout
