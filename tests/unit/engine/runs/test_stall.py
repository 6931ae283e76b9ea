"""Stalls and the wait of a resume: a RUNNING stage's silence per rank (engine.runs.progress_merge activity,
engine.runs.runview stall_of / the run view), the collectives' timeout in the root-cause classifier,
`[run] stall_after_s` in recipes, and engine.runs.runner.wait_driver_released against a real process holding the
driver lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core.errors import StageLockedError
from engine.runs.progress_merge import StageProgress
from engine.runs.rootcause import classify, stalled_cause
from engine.runs.rundir import DEFAULT_STALL_AFTER_S, RunDir, create_run_dir, set_running, set_status
from engine.runs.runner import wait_driver_released, winding_down
from engine.runs.runview import run_view, stall_of

REPO = Path(__file__).resolve().parents[4]


def line(path: Path, kind: str, ts: float, rank: int = 0, **data) -> None:
    """One event line as engine.core.events.JsonlSink writes it, with a chosen time."""
    with open(path, "a") as fh:
        fh.write(json.dumps({"v": 1, "ts": ts, "kind": kind, "stage": "calibrate", "rank": rank,
                             "host": f"node{rank}", **data}) + "\n")


def rank_file(stage_dir: Path, rank: int) -> Path:
    return stage_dir / ("events.jsonl" if rank == 0 else f"events.rank{rank}.jsonl")


def make_run(tmp_path: Path, stall_after_s: float | None = None, world: int = 2) -> RunDir:
    """A run dir with one RUNNING calibrate stage of `world` ranks (rank 0 is this process)."""
    run = create_run_dir(tmp_path / "work")
    (run.path / "plan.json").write_text(json.dumps({"stages": [{"name": "calibrate"}]}))
    (run.path / "run.json").write_text(json.dumps({"id": run.id} | (
        {"stall_after_s": stall_after_s} if stall_after_s else {})))
    from engine.runs.rundir import begin_attempt

    attempt = begin_attempt(run, "calibrate", launcher="local")
    set_running(run, "calibrate", attempt=attempt, host="node0", pid=os.getpid(), world_size=world)
    return run


def test_activity_is_each_ranks_latest_event_of_its_attempt(tmp_path):
    line(rank_file(tmp_path, 0), "state", 100.0, state="RUNNING", attempt=1, pid=11)
    line(rank_file(tmp_path, 0), "progress", 130.0, unit="layers", done=1, total=4)
    line(rank_file(tmp_path, 1), "state", 50.0, rank=1, state="RUNNING", attempt=1, pid=12)
    line(rank_file(tmp_path, 1), "log", 60.0, rank=1, level="info", msg="x")
    sp = StageProgress(tmp_path)
    sp.poll(attempt=1, world=2)
    act = sp.activity(attempt=1, world=2)
    assert {r: (a.last_ts, a.pid, a.host, a.finished) for r, a in act.items()} == {
        0: (130.0, 11, "node0", False), 1: (60.0, 12, "node1", False)}
    assert sp.activity(attempt=2, world=2) == {}  # nothing of attempt 2 yet


def test_stall_of_names_the_quiet_ranks_and_skips_ranks_done_with_their_share(tmp_path):
    line(rank_file(tmp_path, 0), "state", 100.0, state="RUNNING", attempt=1, pid=11)
    line(rank_file(tmp_path, 0), "progress", 990.0, unit="layers", done=1, total=4)
    line(rank_file(tmp_path, 1), "state", 100.0, rank=1, state="RUNNING", attempt=1, pid=12)
    line(rank_file(tmp_path, 2), "state", 100.0, rank=2, state="RUNNING", attempt=1, pid=13)
    line(rank_file(tmp_path, 2), "progress", 120.0, rank=2, unit="shards", done=3, total=3)  # done: it waits
    sp = StageProgress(tmp_path)
    sp.poll(attempt=1, world=4)
    st = {"state": "RUNNING", "attempt": 1, "world_size": 4, "started_at": 100.0, "host": "node0", "pid": 11}
    stall = stall_of(st, sp.activity(1, 4), stall_after_s=600, now=1000.0)
    assert stall.stalled and stall.silent_s == 900.0
    # rank 1 went quiet after its RUNNING event; rank 3 never wrote in this attempt (silent since RUNNING)
    assert stall.quiet_ranks == [{"rank": 1, "host": "node1", "pid": 12, "silent_s": 900.0},
                                 {"rank": 3, "host": None, "pid": None, "silent_s": 900.0}]
    assert stall.line("calibrate") == ("stage calibrate stalled: no event for 900s from rank 1 (pid 12 on node1), "
                                       "rank 3 (pid ? on ?)")
    assert not stall_of(st, sp.activity(1, 4), stall_after_s=901, now=1000.0).stalled
    assert stall_of(dict(st, state="SUCCEEDED"), sp.activity(1, 4), 1, now=1000.0) is None


def test_run_view_gives_stalled_and_silent_s_from_the_runs_stall_after_s(tmp_path):
    run = make_run(tmp_path, stall_after_s=5)
    stage_dir = run.stage_dir("calibrate")
    now = time.time()
    line(rank_file(stage_dir, 0), "state", now - 1, state="RUNNING", attempt=1, pid=os.getpid())
    line(rank_file(stage_dir, 1), "state", now - 60, rank=1, state="RUNNING", attempt=1, pid=4242)
    s = run_view(run).stages[0]
    assert s.stalled and s.silent_s >= 59 and [q["rank"] for q in s.quiet_ranks] == [1]
    assert s.quiet_ranks[0]["pid"] == 4242 and s.quiet_ranks[0]["host"] == "node1"
    line(rank_file(stage_dir, 1), "progress", time.time(), rank=1, unit="layers", done=1, total=4)
    s = run_view(run).stages[0]
    assert not s.stalled and s.silent_s < 5 and s.quiet_ranks == []
    set_status(run, "calibrate", "SUCCEEDED", attempt=1)
    s = run_view(run).stages[0]
    assert (s.stalled, s.silent_s) == (False, None)


def test_stall_after_s_comes_from_run_json_else_the_recipe_else_the_default(tmp_path):
    run = make_run(tmp_path, stall_after_s=7)
    assert run.stall_after_s() == 7
    (run.path / "run.json").write_text("{}")
    assert run.stall_after_s() == DEFAULT_STALL_AFTER_S
    run.recipe_path.write_text('[run]\nstall_after_s = 30\n[source]\npath = "/x"\n')
    assert run.stall_after_s() == 30


def test_recipe_stall_after_s_defaults_and_refuses_zero():
    from engine.core.errors import RecipeError
    from engine.runs.recipe import loads_recipe

    assert loads_recipe('[source]\npath = "/x"\n', name="r.toml").run.stall_after_s == 900
    with pytest.raises(RecipeError, match=r"r.toml: run.stall_after_s"):
        loads_recipe('[source]\npath = "/x"\n[run]\nstall_after_s = 0\n', name="r.toml")


@pytest.mark.parametrize("text", [
    "RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for "
    "recv operation to complete",
    "torch.distributed.DistStoreError: Timed out after 31 seconds waiting for clients. 1/2 clients joined.",
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE) ran for 600000 ms",
])
def test_collective_timeouts_of_gloo_and_nccl_are_nccl_timeout(text):
    cause = classify(f"Traceback (most recent call last):\n  ...\n{text}\n")
    assert cause.cls == "nccl-timeout" and "timed out" in cause.summary and "resume" in cause.hint


def test_a_stalled_worker_that_ended_keeps_the_stall_as_its_root_cause():
    cause = stalled_cause("stage calibrate stalled: no event for 912s from rank 1 (pid 7 on node1)",
                          classify(exit_code=-9))
    assert cause.cls == "stalled" and "rank 1 (pid 7 on node1)" in cause.summary and "SIGKILL" in cause.summary
    assert "resume" in cause.hint


def _hold_driver_lock(run: RunDir) -> subprocess.Popen:
    """Another process holding the run's driver lock, as a live driver does (it prints once it holds it)."""
    code = ("import sys, time; from pathlib import Path; from engine.runs.rundir import RunDir, driver_lock; "
            "lk = driver_lock(RunDir(Path(sys.argv[1]))).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_resume_waits_for_a_driver_whose_worker_is_gone_and_says_so(tmp_path):
    run = make_run(tmp_path, world=1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    set_status(run, "calibrate", "RUNNING", attempt=1, pid=dead.pid, host="local")  # a worker just killed
    holder = _hold_driver_lock(run)
    try:
        assert winding_down(run) == f"worker pid {dead.pid} of stage calibrate on local is gone"
        told: list[str] = []
        t0 = time.monotonic()
        with pytest.raises(StageLockedError, match=r"waited 1s for it to notice that worker pid"):
            wait_driver_released(run, timeout_s=1.0, on_wait=told.append)
        assert time.monotonic() - t0 >= 1.0
        assert len(told) == 1 and f"(pid {holder.pid} on " in told[0] and "stage calibrate" in told[0], told
        told.clear()
        # the driver notices and ends while resume waits: resume goes on
        import threading

        threading.Timer(0.5, holder.kill).start()
        wait_driver_released(run, timeout_s=10.0, on_wait=told.append)
        assert len(told) == 1 and f"worker pid {dead.pid} of stage calibrate" in told[0]
    finally:
        holder.kill()
        holder.wait()


def test_resume_is_refused_at_once_while_the_worker_lives(tmp_path):
    run = make_run(tmp_path, world=1)  # its worker pid is this live process
    holder = _hold_driver_lock(run)
    try:
        t0 = time.monotonic()
        told: list[str] = []
        with pytest.raises(StageLockedError, match=r"already held by pid"):
            wait_driver_released(run, timeout_s=10.0, on_wait=told.append)
        assert time.monotonic() - t0 < 2.0 and told == []
    finally:
        holder.kill()
        holder.wait()
