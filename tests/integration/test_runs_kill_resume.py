"""kill -9 each stage's worker mid-way, resume, and the outputs are byte-identical to an uninterrupted
conversion; the history shows every killed attempt with its root cause, then the successful one. Real
processes only: the `quantdeck` CLI, the detached driver and workers; the pause point is the worker's
documented test hook (QUANTDECK_FAULTS pause_stage / pause_after_units). The reference is
the same conversion done in one go by engine.convert.convert_checkpoint (what `quantdeck convert` and
the convert stage call); calibrate and export kills are in test_runs_export_only.py."""

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
    kill_paused_worker,
    pause,
    qd,
    run_dir,
    run_id_of,
    status,
    tree_digest,
    tree_state,
    wait_driver_done,
    wait_paused,
    write_recipe,
)

# (stage, units done before the pause): convert is killed with some shards finished and some not
CHAIN = [("inspect", 0), ("convert", 30), ("inject-mtp", 0), ("copy-extras", 0), ("validate", 0)]


@pytest.mark.slow
def test_kill_every_stage_then_resume(tmp_path, tiny_ckpt, monkeypatch):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    work = tmp_path / "work"
    ref_out, out = tmp_path / "ref-out", tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.toml", src, work, out)

    # 1st stage, started in the foreground: Ctrl-C (SIGINT to the follower's process group) stops
    # following, never the run — the worker stays parked until we kill it.
    # Ctrl-C as at a terminal: a shell that starts its commands in the background (a CI runner's may) leaves SIGINT
    # ignored in them, and python keeps an ignored SIGINT ignored, so the follower gets the default back first
    fg = subprocess.Popen([sys.executable, "-m", "console.cli", "run", str(recipe)], cwd=REPO,
                          env=env(**pause("inspect", 0)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = fg.stdout.readline()
    assert first.startswith("run "), first
    rid = first.split()[1]
    wait_paused(work, rid, "inspect")
    os.killpg(fg.pid, signal.SIGINT)
    _, err = fg.communicate(timeout=30)
    assert fg.returncode == 0 and "goes on" in err, err
    assert status(work, rid, "inspect")["state"] == "RUNNING"

    killed = {}
    for i, (stage, units) in enumerate(CHAIN):
        if i > 0:
            r = qd("resume", rid, "--detach", **pause(stage, units))
            assert r.returncode == 0 and run_id_of(r) == rid, r.stderr
        if stage == "convert":
            wait_paused(work, rid, stage)
            man = json.loads((tmp_path / "out.partial" / "manifest.json").read_text())
            assert 0 < len(man["shards"]) < len(man["planned_shards"])  # really mid-way
        killed[stage] = kill_paused_worker(work, rid, stage)
        wait_driver_done(work, rid)
        st = status(work, rid, stage)
        assert st["state"] == "FAILED_WORKER" and st["error_class"] == "killed", st
        assert "SIGKILL" in st["error"] and st["hint"]

    r = qd("resume", rid)  # follows to the end
    assert r.returncode == 0, r.stderr
    assert "SUCCEEDED" in r.stderr

    from engine.convert import convert_checkpoint  # the uninterrupted reference, in one go

    monkeypatch.delenv("QUANTDECK_FSYNC", raising=False)  # as a run writes on its own machine (engine.runs.durability)
    convert_checkpoint(src, ref_out, to="nvfp4", layouts=("modelopt",), device="cpu", shard_size=int(0.1 * 10**6))
    assert tree_digest(out) == tree_digest(ref_out)
    assert not (tmp_path / "out.partial").exists()

    # the history: one row per run; the killed attempts with their root cause, then the successful ones
    h = json.loads(qd("history", "--json").stdout)
    row = next(x for x in h if x["id"] == rid)
    assert row["result"] == "SUCCEEDED" and row["root_cause"].startswith("killed")
    atts = json.loads(qd("history", rid, "--json").stdout)
    for stage, _ in CHAIN:
        mine = [(a["attempt"], a["state"], a["error_class"], a["pid"]) for a in atts if a["stage"] == stage]
        assert mine == [(1, "FAILED_WORKER", "killed", killed[stage]), (2, "SUCCEEDED", None, mine[1][3])], mine
    table = qd("history").stdout
    assert rid in table and "killed" in table

    ok = qd("validate-only", rid)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # validate-only on a corrupted shard: reported, nothing changed
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = tree_state(out), tree_state(run_dir(work, rid))
    r = qd("validate-only", rid)
    assert r.returncode == 4, r.stderr
    assert shard.name in r.stdout and "sha256" in r.stdout
    assert (tree_state(out), tree_state(run_dir(work, rid))) == before
