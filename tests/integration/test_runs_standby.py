"""Standby workers (engine.runs.local_launcher `prepare`): the driver starts the next stage's worker ahead, and it
waits for its go before it touches the run dir. Without the go (dropped, its driver cancelled or dead) it ends and
the run dir is as before; a run through standbys records what a run without them records, with the standbys'
own pids; nothing of them outlives a cancelled or failed run. Real processes only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from engine.runs.launcher import WorkerHandle, WorkerSpec
from engine.runs.local_launcher import REPO_ROOT, LocalLauncher, child_env, worker_command
from engine.runs.rundir import RunDir
from engine.runs.runner import create_run, drive
from tests.integration.runs_support import (
    kill_paused_worker,
    pause,
    pid_gone,
    qd,
    run_dir,
    run_id_of,
    status,
    tree_state,
    wait_driver_done,
    wait_for,
    wait_paused,
    write_recipe,
)

STAGES = ["inspect", "convert", "inject-mtp", "copy-extras", "validate"]


def _run(tmp_path: Path, src: Path, name: str) -> RunDir:
    work = tmp_path / name
    return create_run(write_recipe(tmp_path / f"{name}.toml", src, work, tmp_path / f"{name}-out"))


def _spec(rd: RunDir, stage: str) -> WorkerSpec:
    return WorkerSpec(run_dir=str(rd.path), stage=stage, log_path=str(rd.log_path(stage)))


def _everything(root: Path) -> tuple[list[str], dict]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")), tree_state(root)


def test_a_standby_without_its_go_ends_and_touches_nothing(tmp_path, tiny_ckpt):
    rd = _run(tmp_path, tiny_ckpt("deepseek-v3", "bf16"), "a")
    before = _everything(rd.path)

    # end of file on its stdin (its driver dropped it, or died): it exits by itself, code 0
    proc = subprocess.Popen([*worker_command(_spec(rd, "convert")), "--standby", str(rd.log_path("convert"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(), cwd=str(REPO_ROOT))
    out, _ = proc.communicate(b"", timeout=120)
    assert proc.returncode == 0, out

    # anything but the go: the same
    proc = subprocess.Popen([*worker_command(_spec(rd, "convert")), "--standby", str(rd.log_path("convert"))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=child_env(), cwd=str(REPO_ROOT))
    out, _ = proc.communicate(b"stop\n", timeout=120)
    assert proc.returncode == 0, out

    # prepared by the launcher, never started: closing the launcher ends it
    launcher = LocalLauncher()
    h = launcher.prepare(_spec(rd, "inspect"))
    assert h is not None and not pid_gone(h.pid)
    assert launcher.prepare(_spec(rd, "inspect")) is None  # one standby a stage
    launcher.close()
    assert pid_gone(h.pid)
    assert _everything(rd.path) == before


def test_the_go_moves_a_standbys_output_to_the_log_after_what_it_printed_before(tmp_path, tiny_ckpt):
    import tempfile

    rd = _run(tmp_path, tiny_ckpt("deepseek-v3", "bf16"), "a")
    with tempfile.TemporaryFile() as spool:
        spool.write(b"printed before the go\n")
        spool.flush()
        proc = subprocess.Popen([*worker_command(_spec(rd, "inspect")), "--standby", str(rd.log_path("inspect"))],
                                stdin=subprocess.PIPE, stdout=spool, stderr=subprocess.STDOUT, env=child_env(),
                                cwd=str(REPO_ROOT))
        proc.communicate(b"go\n", timeout=120)
        assert proc.returncode == 0
        assert spool.seek(0, os.SEEK_END) == len(b"printed before the go\n")  # nothing more went there
    log = rd.log_path("inspect").read_text()
    assert log.startswith("printed before the go\nquantdeck worker: stage inspect of run"), log
    assert "stage inspect succeeded" in log
    assert json.loads(rd.status_path("inspect").read_text())["state"] == "SUCCEEDED"


def test_start_uses_a_live_standby_else_launches_afresh(tmp_path, tiny_ckpt):
    from engine.runs.rundir import begin_attempt, read_status, set_status
    from engine.runs.runner import wait_stage

    rd = _run(tmp_path, tiny_ckpt("deepseek-v3", "bf16"), "a")
    launcher = LocalLauncher()

    def run_stage(stage: str, spec: WorkerSpec) -> WorkerHandle:
        attempt = begin_attempt(rd, stage, launcher=launcher.name)
        h = launcher.start(spec)
        set_status(rd, stage, "STARTING", attempt=attempt, host=h.host, pid=h.pid)
        assert wait_stage(rd, stage, attempt, launcher, h.host, h.pid, 0.05)["state"] == "SUCCEEDED"
        return h

    ahead = launcher.prepare(_spec(rd, "inspect"))
    assert run_stage("inspect", _spec(rd, "inspect")) == ahead
    assert read_status(rd, "inspect")["pid"] == ahead.pid

    gone = launcher.prepare(_spec(rd, "convert"))  # killed before its go
    os.kill(gone.pid, 9)
    wait_for(lambda: pid_gone(gone.pid), 30, "the standby to die")
    assert run_stage("convert", _spec(rd, "convert")).pid != gone.pid

    other = launcher.prepare(_spec(rd, "inject-mtp"))  # prepared for another spec than the one started
    h = run_stage("inject-mtp", WorkerSpec(run_dir=str(rd.path), stage="inject-mtp",
                                           log_path=str(rd.log_path("inject-mtp")), env={"QUANTDECK_DEBUG": "0"}))
    assert h.pid != other.pid and pid_gone(other.pid)
    launcher.close()
    for stage in ("inspect", "convert", "inject-mtp"):
        assert (rd.log_path(stage)).read_text().startswith(f"quantdeck worker: stage {stage} of run {rd.id}")


class _Recording(LocalLauncher):
    def __init__(self) -> None:
        super().__init__()
        self.ahead: dict[str, int] = {}

    def prepare(self, spec: WorkerSpec) -> WorkerHandle | None:
        h = super().prepare(spec)
        if h is not None:
            self.ahead[spec.stage] = h.pid
        return h


class _NoStandby(LocalLauncher):
    def prepare(self, spec: WorkerSpec) -> WorkerHandle | None:
        return None


VOLATILE = {"ts", "pid", "pgid", "pid_start", "started_at", "ended_at", "updated_at"}


def _steady(x: object) -> object:
    """`x` without what differs from one run to the next: times, pids, and figures in seconds (`*_s`)."""
    if isinstance(x, dict):
        return {k: _steady(v) for k, v in x.items() if k not in VOLATILE and not k.endswith("_s")}
    if isinstance(x, list):
        return [_steady(v) for v in x]
    return x


def _recorded(rd: RunDir, out: Path) -> dict:
    """Each stage's status and events (progress aside: it is throttled by time), steady, its paths and pids named
    alike."""

    def load(text: str) -> object:
        text = text.replace(str(rd.path), "RUN").replace(str(out), "OUT").replace(rd.id, "ID")
        return json.loads(re.sub(r"\bpid \d+", "pid N", text))

    return {stage: (_steady(load(rd.status_path(stage).read_text())),
                    [_steady(e) for e in map(load, rd.events_path(stage).read_text().splitlines())
                     if e["kind"] != "progress"])
            for stage in STAGES}


def test_a_run_through_standbys_records_what_one_without_them_does(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    with_, without = _run(tmp_path, src, "a"), _run(tmp_path, src, "b")
    launcher = _Recording()
    assert drive(with_, launcher=launcher) == "SUCCEEDED"
    assert drive(without, launcher=_NoStandby()) == "SUCCEEDED"

    assert sorted(launcher.ahead) == sorted(STAGES[1:])  # every stage but the first started ahead
    for stage, pid in launcher.ahead.items():  # ... and is recorded with the standby's own pid
        st = json.loads(with_.status_path(stage).read_text())
        assert st["pid"] == st["pgid"] == pid and st["attempts"][-1]["pid"] == pid
        assert f"pid {pid} " in with_.log_path(stage).read_text()
        assert pid_gone(pid)
    assert _recorded(with_, tmp_path / "a-out") == _recorded(without, tmp_path / "b-out")


def _standbys(rd: Path) -> dict[str, int]:
    """stage → pid of the live standby workers of run dir `rd` (from /proc)."""
    found = {}
    for p in Path("/proc").iterdir():
        try:
            argv = (p / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "engine.runs.worker" in argv and "--standby" in argv and str(rd) in argv and not pid_gone(int(p.name)):
            found[argv[argv.index("engine.runs.worker") + 1]] = int(p.name)
    return found


def test_a_cancelled_or_failed_run_leaves_no_standby_behind(tmp_path, tiny_ckpt):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    work, out = tmp_path / "work", tmp_path / "out"
    r = qd("run", write_recipe(tmp_path / "recipe.toml", src, work, out), "--detach", **pause("convert"))
    rid = run_id_of(r)
    rd = run_dir(work, rid)
    wait_paused(work, rid, "convert")
    ahead = wait_for(lambda: _standbys(rd).get("inject-mtp"), 60, "inject-mtp's standby")

    # cancel: the driver is stopped (no clean-up of its own), so the standby meets the end of its stdin
    c = qd("cancel", rid)
    assert c.returncode == 0, c.stderr
    wait_driver_done(work, rid)
    wait_for(lambda: pid_gone(ahead), 60, f"standby {ahead} to end")
    st = status(work, rid, "inject-mtp")
    assert st["state"] == "PENDING" and st["attempt"] == 0 and st["pid"] is None
    assert sorted(p.name for p in (rd / "stages" / "inject-mtp").iterdir()) == ["status.json"]

    # a worker killed -9: the driver records it and drops the standby on its way out
    (rd / "stages" / "convert" / "test-paused").unlink()  # the cancelled worker's
    r = qd("resume", rid, "--detach", **pause("convert"))
    assert r.returncode == 0, r.stderr
    wait_paused(work, rid, "convert")
    ahead = wait_for(lambda: _standbys(rd).get("inject-mtp"), 60, "inject-mtp's standby")
    kill_paused_worker(work, rid, "convert")
    wait_driver_done(work, rid)
    assert pid_gone(ahead) and not _standbys(rd)
    assert status(work, rid, "convert")["state"] == "FAILED_WORKER"
    assert status(work, rid, "inject-mtp")["state"] == "PENDING"

    r = qd("resume", rid)
    assert r.returncode == 0, r.stderr
    assert all(status(work, rid, s)["state"] == "SUCCEEDED" for s in STAGES)
    assert not _standbys(rd)
    log = (rd / "stages" / "inject-mtp" / "log.txt").read_text()
    assert len(re.findall(r"^quantdeck worker: stage inject-mtp of run", log, re.M)) == 1, log


def test_a_validate_standby_checks_the_shards_convert_writes_and_validate_takes_them(tmp_path, tiny_ckpt):
    """validate's worker started ahead beside convert (as on 8 cores or more) checks the output's shards as they
    are finished; the validate stage takes those findings (its log says how many) and records what a validate
    started afresh records."""
    from engine.runs.rundir import begin_attempt, set_status
    from engine.runs.runner import wait_stage

    def run_stage(rd: RunDir, launcher: LocalLauncher, stage: str) -> None:
        attempt = begin_attempt(rd, stage, launcher=launcher.name)
        h = launcher.start(_spec(rd, stage))
        set_status(rd, stage, "STARTING", attempt=attempt, host=h.host, pid=h.pid)
        assert wait_stage(rd, stage, attempt, launcher, h.host, h.pid, 0.05)["state"] == "SUCCEEDED"

    src = tiny_ckpt("deepseek-v3", "fp8")
    runs = {name: _run(tmp_path, src, name) for name in ("a", "b")}
    for name, rd in runs.items():
        launcher = LocalLauncher()
        run_stage(rd, launcher, "inspect")
        ahead = launcher.prepare(_spec(rd, "validate")) if name == "a" else None
        for stage in STAGES[1:]:
            if stage == "validate" and ahead is not None:
                time.sleep(3)  # the standby's imports and its follower's first look (every 0.25 s), on a busy machine
            run_stage(rd, launcher, stage)
        launcher.close()
        log = rd.log_path("validate").read_text()
        if ahead is not None:
            assert f"pid {ahead.pid} " in log
            taken = re.search(r"quantdeck validate: .*: (\d+) module\(s\) and tensor\(s\) checked as the output was "
                              r"written, of (\d+)", log)
            assert taken and 0 < int(taken.group(1)) == int(taken.group(2)), log
        else:
            assert "checked as the output was written" not in log
    a, b = (_recorded(runs[n], tmp_path / f"{n}-out") for n in ("a", "b"))
    assert a["validate"] == b["validate"]
    reports = []
    for n in ("a", "b"):  # the reports, check by check, each output's directory named alike
        text = (runs[n].stage_dir("validate") / "report.json").read_text()
        reports.append(json.loads(text.replace(str(tmp_path / f"{n}-out"), "OUT")))
    assert reports[0] == reports[1] and all(r["ok"] for r in reports[0].values())
