"""engine.runs.durability: which stages a resume does again after a reboot, and the driver's syncs behind the run."""

from __future__ import annotations

import threading
import time

import pytest

from engine.core.names import StageState as S
from engine.runs import durability
from engine.runs.durability import Syncer, stage_states, written_paths
from engine.runs.plan import Plan
from engine.runs.rundir import RunDir, begin_attempt, create_run_dir, read_status, set_status

NAMES = ["inspect", "convert", "inject-mtp", "validate"]


@pytest.fixture
def run(tmp_path) -> tuple[RunDir, Plan]:
    r = create_run_dir(tmp_path / "work")
    plan = Plan.from_json({"run_id": r.id, "stages": [
        {"name": "inspect", "inputs": {"src": str(tmp_path / "src")}},
        {"name": "convert", "inputs": {"src": str(tmp_path / "src")}, "outputs": {"dst": str(tmp_path / "out")},
         "options": {"to": "nvfp4"}},
        {"name": "inject-mtp", "outputs": {"dst": str(tmp_path / "out")}},
        {"name": "validate", "outputs": {"report": "relative/report.json"}}]})
    return r, plan


def _done(run: RunDir, stage: str, synced: bool | None, boot: str) -> int:
    a = begin_attempt(run, stage)
    set_status(run, stage, S.SUCCEEDED, attempt=a, synced=synced, boot=boot)
    return a


def test_a_reboot_before_a_sync_redoes_that_stage_and_every_later_one(run, monkeypatch):
    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b1")
    _done(r, "inspect", True, "b1")
    _done(r, "convert", False, "b1")
    _done(r, "inject-mtp", True, "b1")  # synced, but after a stage that may have lost its writes
    assert stage_states(r, plan) == ({n: ("SUCCEEDED" if n != "validate" else "PENDING") for n in NAMES}, [])
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b2")
    states, again = stage_states(r, plan)
    assert again == ["convert", "inject-mtp", "validate"]
    assert states == {"inspect": "SUCCEEDED", "convert": "PENDING", "inject-mtp": "PENDING", "validate": "PENDING"}
    assert read_status(r, "convert")["state"] == "SUCCEEDED"  # only the resume's view: nothing is written


def test_stages_recorded_by_a_worker_that_fsynced_are_kept_after_a_reboot(run, monkeypatch):
    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b2")
    for n in NAMES:
        _done(r, n, True, "b1")
    _done(r, "validate", None, "b1")  # a status written before the field existed: trusted, as then
    assert stage_states(r, plan)[1] == []


def test_written_paths_are_the_run_dir_and_the_stages_absolute_paths(run, tmp_path):
    r, plan = run
    assert set(written_paths(r, plan)) == {r.path, tmp_path / "src", tmp_path / "out"}


def test_the_syncer_records_each_stage_synced_after_one_sync_and_a_failed_sync_records_nothing(run, monkeypatch,
                                                                                                 capsys):
    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b1")
    calls = []
    monkeypatch.setattr(durability, "sync_filesystems", lambda paths: calls.append(list(paths)))
    s = Syncer(r, written_paths(r, plan))
    s.after("inspect", _done(r, "inspect", False, "b1"))
    s.after("convert", _done(r, "convert", False, "b1"))
    assert s.close() >= 0
    assert 1 <= len(calls) <= 2 and calls[0] == written_paths(r, plan)
    assert [read_status(r, n)["synced"] for n in ("inspect", "convert")] == [True, True]

    def fail(paths):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durability, "sync_filesystems", fail)
    s = Syncer(r, written_paths(r, plan))
    s.after("inject-mtp", _done(r, "inject-mtp", False, "b1"))
    s.close()
    assert read_status(r, "inject-mtp")["synced"] is False  # a resume after a reboot does it again
    assert "sync after inject-mtp failed" in capsys.readouterr().err
    assert Syncer(r, []).close() >= 0  # nothing handed to it: no thread, no wait


def test_the_syncer_waits_for_a_quiet_stage_to_run_before_it_syncs(run, monkeypatch):
    """Stages that write (inject-mtp here) get no sync beside them: their small fsyncs would wait for the whole
    flush. A sync starts once validate's worker has recorded itself running, and covers every stage before it."""
    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b1")
    calls = []
    monkeypatch.setattr(durability, "sync_filesystems", lambda paths: calls.append(read_status(r, "validate")))
    s = Syncer(r, written_paths(r, plan), poll_s=0.01)
    s.after("convert", _done(r, "convert", False, "b1"))
    s.beside("inject-mtp")
    s.after("inject-mtp", _done(r, "inject-mtp", False, "b1"))
    v = begin_attempt(r, "validate")
    set_status(r, "validate", S.STARTING, attempt=v)
    s.beside("validate")
    runs = threading.Timer(0.2, lambda: set_status(r, "validate", S.RUNNING, attempt=v))
    runs.start()
    runs.join()
    for _ in range(500):
        if calls:
            break
        time.sleep(0.01)
    assert [c["state"] for c in calls] == ["RUNNING"]  # one sync, begun once validate ran
    assert s.close() >= 0 and len(calls) == 1  # nothing left for the end
    assert [read_status(r, n)["synced"] for n in ("convert", "inject-mtp")] == [True, True]


def test_without_a_quiet_stage_the_run_end_syncs(run, monkeypatch):
    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b1")
    calls = []
    monkeypatch.setattr(durability, "sync_filesystems", lambda paths: calls.append(1))
    s = Syncer(r, written_paths(r, plan))
    s.after("convert", _done(r, "convert", False, "b1"))
    s.beside("inject-mtp")
    time.sleep(0.1)
    assert calls == [] and read_status(r, "convert")["synced"] is False
    s.close()
    assert calls == [1] and read_status(r, "convert")["synced"] is True


def test_an_unreadable_status_or_a_close_ends_the_wait_and_the_sync_still_runs(run, monkeypatch, capsys):
    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b1")
    calls = []
    monkeypatch.setattr(durability, "sync_filesystems", lambda paths: calls.append(1))
    s = Syncer(r, written_paths(r, plan), start_wait_s=60)
    s.after("convert", _done(r, "convert", False, "b1"))
    set_status(r, "validate", S.STARTING, attempt=begin_attempt(r, "validate"))
    s.beside("validate")  # never runs: close() ends the wait at once
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 10 and calls == [1] and read_status(r, "convert")["synced"] is True

    real = durability.read_status

    def broken(run_dir, stage):
        if stage == "validate":
            raise OSError(24, "Too many open files")
        return real(run_dir, stage)

    monkeypatch.setattr(durability, "read_status", broken)
    s = Syncer(r, written_paths(r, plan))
    s.after("inject-mtp", _done(r, "inject-mtp", False, "b1"))
    s.beside("validate")
    s.close()
    assert calls == [1, 1] and real(r, "inject-mtp")["synced"] is True
    assert "cannot read validate's status" in capsys.readouterr().err


def test_stages_a_dead_driver_left_unsynced_on_this_boot_are_found(run, monkeypatch):
    from engine.runs.durability import unsynced_here

    r, plan = run
    monkeypatch.setenv("QUANTDECK_BOOT_ID", "b1")
    _done(r, "inspect", True, "b1")
    a = _done(r, "convert", False, "b1")
    _done(r, "inject-mtp", False, "b0")  # another boot: stage_states has the resume do it again
    assert unsynced_here(r, plan) == [("convert", a)]
