"""Remote command lines: quoted argument lists, explicit environment, no secret on a command line."""

from __future__ import annotations

import subprocess
import time

import pytest

from engine.core.errors import RemoteError
from engine.runs.launcher import WorkerSpec
from remote.launchers import DETACH, node_log, torchrun_argv, worker_argv
from remote.ssh import backoff_delays, build_command, secret_stdin, split_env

NASTY = ["a b", "it's", '"dq"', "$(rm -rf /)", "`id`", "x;y", "", "new\nline", "*"]


def test_build_command_round_trips_through_a_real_shell():
    line = build_command(["printf", "%s\\0", *NASTY], env={"A_B": "v w'x"}, cwd="/tmp/dir with space")
    assert line.startswith("cd '/tmp/dir with space' && env 'A_B=v w'")
    out = subprocess.run(["sh", "-c", line.replace("cd '/tmp/dir with space' && ", "")],
                         capture_output=True).stdout
    assert out.split(b"\0")[:-1] == [a.encode() for a in NASTY]


def test_secrets_never_reach_a_command_line():
    plain, secret = split_env({"PYTHONPATH": "/x", "HF_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s",
                               "AWS_SESSION_TOKEN": "z", "MY_API_KEY": "k"})
    assert plain == {"PYTHONPATH": "/x"} and set(secret) == {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY",
                                                             "AWS_SESSION_TOKEN", "MY_API_KEY"}
    with pytest.raises(RemoteError, match="HF_TOKEN") as ei:
        build_command(["true"], env={"HF_TOKEN": "hf_abc"})
    assert "hf_abc" not in str(ei.value)
    assert secret_stdin({"HF_TOKEN": "a'b"}) == b"export HF_TOKEN='a'\"'\"'b'\n"


def test_bad_env_names_are_refused():
    with pytest.raises(RemoteError):
        build_command(["true"], env={"A=B": "x"})


def test_worker_and_torchrun_argv():
    spec = WorkerSpec(run_dir="/w/runs/r 1", stage="calibrate", args=("--mode", "run"))
    assert worker_argv("py", "engine.runs.worker", spec) == ["py", "-m", "engine.runs.worker", "calibrate", "--run-dir",
                                                        "/w/runs/r 1", "--mode", "run"]
    tr = torchrun_argv("py", "engine.runs.worker", spec, nnodes=4, node_rank=2, master_addr="10.0.0.1",
                       master_port=29511, nproc_per_node=8)
    assert tr[:3] == ["py", "-m", "torch.distributed.run"]
    assert tr[tr.index("--nnodes") + 1] == "4" and tr[tr.index("--node_rank") + 1] == "2"
    assert tr[tr.index("--master_addr") + 1] == "10.0.0.1" and tr[tr.index("--nproc-per-node") + 1] == "8"
    worker = ["-m", "engine.runs.worker", "calibrate", "--run-dir", "/w/runs/r 1", "--mode", "run"]
    assert tr[tr.index("-m", 3):] == worker
    assert node_log("/w/stages/calibrate/log.txt", "n2") == "/w/stages/calibrate/log.n2.txt"


def test_detach_script_starts_a_session_leader_and_records_the_exit(tmp_path):
    log, rc = tmp_path / "d" / "log.txt", tmp_path / "d" / "log.txt.exit"
    line = build_command(["sh", "-c", DETACH, "qd", str(log), str(rc), "sh", "-c", "echo hi; exit 3"])
    pid = int(subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=10).stdout.strip())
    for _ in range(100):
        if rc.exists() and rc.read_text().strip():
            break
        time.sleep(0.05)
    assert rc.read_text().strip() == "3" and "hi" in log.read_text() and pid > 1


def test_backoff_grows_and_caps():
    g = backoff_delays(0.5, 2, 4)
    assert [next(g) for _ in range(5)] == [0.5, 1, 2, 4, 4]
