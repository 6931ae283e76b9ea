"""Run dirs: one status writer under the lock, never backwards, FAILED_WORKER for a vanished pid, locks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.core.errors import RunError, StageLockedError
from engine.core.locks import exit_waker, pid_alive
from engine.core.names import StageState as S
from engine.runs.rundir import (
    RunDir,
    begin_attempt,
    create_run_dir,
    find_run,
    mark_synced,
    read_status,
    reconcile_stage,
    set_running,
    set_status,
    stage_lock,
)


@pytest.fixture
def run(tmp_path) -> RunDir:
    r = create_run_dir(tmp_path / "work")
    r.plan_path.write_text('{"run_id": "%s", "stages": [{"name": "convert"}]}' % r.id)
    return r


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_attempt_lifecycle_stamps_times(run):
    assert read_status(run, "convert")["state"] == "PENDING"
    a = begin_attempt(run, "convert", launcher="local")
    st = set_running(run, "convert", attempt=a, host="h", pid=os.getpid())
    assert st["state"] == "RUNNING" and st["started_at"] and not st["ended_at"] and st["pgid"] == os.getpgid(0)
    st = set_status(run, "convert", S.SUCCEEDED, attempt=a, result={"shards": 2})
    assert st["ended_at"] >= st["started_at"] and st["result"] == {"shards": 2}
    assert [x["state"] for x in st["attempts"]] == ["SUCCEEDED"]


def test_never_backwards_and_terminal_is_final(run):
    a = begin_attempt(run, "convert")
    set_running(run, "convert", attempt=a, host="h", pid=os.getpid())
    assert set_status(run, "convert", S.STARTING, attempt=a)["state"] == "RUNNING"
    set_status(run, "convert", S.CANCELLED, attempt=a)
    assert set_status(run, "convert", S.FAILED, attempt=a)["state"] == "CANCELLED"
    assert set_status(run, "convert", S.RUNNING, attempt=a)["state"] == "CANCELLED"
    b = begin_attempt(run, "convert")
    assert b == a + 1
    assert set_status(run, "convert", S.SUCCEEDED, attempt=a)["state"] == "STARTING"  # old attempt ignored
    with pytest.raises(StageLockedError):
        begin_attempt(run, "convert")  # the live attempt is not replaced


def test_vanished_worker_becomes_failed_worker(run):
    a = begin_attempt(run, "convert")
    set_running(run, "convert", attempt=a, host="h", pid=os.getpid())
    assert reconcile_stage(run, "convert")["state"] == "RUNNING"  # alive
    set_status(run, "convert", S.RUNNING, attempt=a, pid=_dead_pid(), pid_start=None)
    st = reconcile_stage(run, "convert")
    assert st["state"] == "FAILED_WORKER" and st["error_class"] == "worker-lost" and st["ended_at"]
    assert reconcile_stage(run, "convert")["state"] == "FAILED_WORKER"


def test_pid_alive_checks_reuse_and_zombies():
    assert pid_alive(os.getpid()) and not pid_alive(_dead_pid()) and not pid_alive(None)
    assert not pid_alive(os.getpid(), pid_start="1")  # same pid, other start time: reused
    z = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    time.sleep(0.5)
    assert not pid_alive(z.pid)  # exited, not reaped: a zombie is dead
    z.wait()


def test_exit_waker_ends_a_sleep_when_the_process_exits():
    import threading

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    with exit_waker(child.pid) as sleep:
        t = threading.Thread(target=sleep, args=(3600,))
        t.start()
        child.stdin.close()  # it exits
        t.join(60)
        assert not t.is_alive()  # the hour-long sleep ended with it
        sleep(0.01)  # a plain sleep from then on: no busy loop on the exited process
    child.wait()
    with exit_waker(None) as sleep:  # no pid (another host's driver): a plain sleep
        sleep(0.01)


def test_exit_waker_in_a_process_with_many_descriptors_open():
    """The pidfd numbered past 1024 (a console or test run with many files open): select() cannot take it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    import threading

    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        with exit_waker(child.pid) as sleep:
            failed: list[BaseException] = []

            def wait() -> None:
                try:
                    sleep(3600)
                except BaseException as e:  # noqa: BLE001 - what the assertion reports
                    failed.append(e)

            t = threading.Thread(target=wait)
            t.start()
            child.stdin.close()  # it exits
            t.join(60)
            assert not t.is_alive() and not failed, failed  # woken by the exit, with no error
        child.wait()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stage_lock_refuses_second_live_worker_and_clears_stale(run, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from engine.runs.rundir import RunDir, stage_lock\n"
        "from pathlib import Path\n"
        "l = stage_lock(RunDir(Path(%r)), 'convert').acquire(); print('held', flush=True); time.sleep(60)"
    ) % (str(os.getcwd()), str(run.path))], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[4])})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StageLockedError, match=f"pid {holder.pid}"):
        stage_lock(run, "convert").acquire()
    holder.kill()
    holder.wait()
    lk = stage_lock(run, "convert").acquire()
    assert lk.stale and lk.stale["pid"] == holder.pid  # the dead holder's lock was cleared
    lk.release()


def test_find_run_by_prefix(run, tmp_path):
    assert find_run(tmp_path / "work", run.id[:-2]).id == run.id
    assert find_run(tmp_path / "work", str(run.path)).id == run.id
    with pytest.raises(RunError, match="no run"):
        find_run(tmp_path / "work", "19990101")


def test_mark_synced_records_the_sync_of_a_done_attempt_only(run):
    a = begin_attempt(run, "convert")
    set_running(run, "convert", attempt=a, host="h", pid=os.getpid())
    assert mark_synced(run, "convert", a)["synced"] is None  # not done yet: nothing to record
    set_status(run, "convert", S.SUCCEEDED, attempt=a, synced=False, boot="b1")
    assert mark_synced(run, "convert", a + 1)["synced"] is False  # another attempt's sync
    st = mark_synced(run, "convert", a)
    assert (st["state"], st["synced"], st["boot"]) == ("SUCCEEDED", True, "b1")
    assert read_status(run, "convert")["synced"] is True
