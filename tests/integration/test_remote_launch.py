"""The SSH launcher on real sshd nodes: detached workers that outlive the connection, and killed ones."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from engine.core.errors import RemoteError
from engine.core.names import StageState
from engine.core.settings import fault_spec
from engine.runs.launcher import WorkerSpec
from engine.runs.rundir import begin_attempt, read_status
from remote.follow import StageFollower
from remote.launchers import SSHLauncher, launcher_for

REPO = Path(__file__).resolve().parents[2]


def wait_for(pred, timeout=20.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out")


def make_run(cluster, tmp_path):
    """A real run dir (engine.runs.runner.create_run) from a recipe whose [cluster] is the four sshd nodes."""
    from engine.runs.runner import create_run

    nodes = "\n".join(f'[[cluster.nodes]]\nname = "{n["name"]}"\nhost = "{n["host"]}"\nport = {n["port"]}\n'
                      f'user = "{n["user"]}"\nkey = "{n["key"]}"\n' for n in cluster.cluster_dict()["nodes"])
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[run]\nworkdir = "{cluster.work_dir}"\n\n[source]\npath = "{tmp_path / "ckpt"}"\n\n'
                      f'[cluster]\nhead = "node0"\npython = "{sys.executable}"\n\n{nodes}')
    return create_run(recipe)


def test_worker_outlives_a_killed_sshd_and_the_follower_reattaches(sshd_cluster, tmp_path):
    c = sshd_cluster
    launcher = SSHLauncher(c.cluster_dict(), module="tests.integration.ticker_worker")
    run_dir = c.work_dir / "runs" / "r1"
    try:
        h = launcher.start(WorkerSpec(run_dir=str(run_dir), stage="tick", node="node2",
                                      args=("--count", "60", "--interval", "0.05")))
        assert h.host == "node2"
        conn = launcher.pool.get("node2")
        follower = StageFollower(conn.read_bytes, str(run_dir / "stages" / "tick"))
        seen = []
        wait_for(lambda: seen.extend(follower.poll().events) or len(seen) >= 5)
        c.node("node2").kill()  # sshd and its sessions die; the detached worker must not
        up = follower.poll()
        assert not up.connected and "node2" in up.error
        assert launcher.is_alive("node2", h.pid)  # unreachable is not dead (grace), the run is not failed
        with pytest.raises(RemoteError):
            launcher.check_alive("node2", h.pid)
        time.sleep(1.0)  # the worker keeps writing while nobody watches
        c.node("node2").start()
        time.sleep(0.6)  # past the reconnect backoff

        def finished():
            up = follower.poll()
            seen.extend(up.events)
            return any(e.kind == "state" and e.data["state"] == "SUCCEEDED" for e in seen)

        wait_for(finished)
        assert follower.reconnects >= 1 and conn.connects >= 2
        done = [e.data["done"] for e in seen if e.kind == "progress"]
        assert done == list(range(1, 61))  # nothing lost, nothing repeated
        assert all(e.host == "node2" for e in seen)
        wait_for(lambda: not launcher.check_alive("node2", h.pid))
        assert launcher.exit_code(h.pid) == 0
        assert b"ticker done" in (run_dir / "stages" / "tick" / "log.txt").read_bytes()
    finally:
        launcher.close()


def test_real_worker_killed_on_its_node_is_recorded_failed(sshd_cluster, tmp_path, monkeypatch):
    kill_a_remote_worker(sshd_cluster, tmp_path, monkeypatch)


def kill_a_remote_worker(sshd_cluster, tmp_path, monkeypatch):
    """Start the real engine.runs.worker for `inspect` on node3 (parked by the worker's test hook), restart node3's
    sshd under it, then SIGKILL it there: the runner's wait records FAILED_WORKER, root cause `killed`."""
    from engine.runs.runner import load_frozen_recipe, wait_stage

    c = sshd_cluster
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(c.known_hosts))  # the per-test known_hosts and ssh config
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(c.ssh_config))
    run = make_run(c, tmp_path)
    launcher = launcher_for(load_frozen_recipe(run), run.path)  # the runner's factory, from the frozen recipe
    assert isinstance(launcher, SSHLauncher) and launcher.cluster.head_name == "node0"
    try:
        attempt = begin_attempt(run, "inspect", launcher=launcher.name)
        h = launcher.start(WorkerSpec(run_dir=str(run.path), stage="inspect", node="node3",
                                      log_path=str(run.log_path("inspect")),
                                      env={"QUANTDECK_FAULTS": fault_spec(pause_stage="inspect"),
                                           "PYTHONPATH": str(REPO)}))
        wait_for(lambda: (run.stage_dir("inspect") / "test-paused").exists())
        st = read_status(run, "inspect")
        assert st["state"] == StageState.RUNNING.value and st["host"] == "node3"
        worker_pid = int(st["pid"])
        # the node's sshd restarts under the live worker: it went on
        c.node("node3").kill()
        c.node("node3").start()
        time.sleep(0.6)
        wait_for(lambda: launcher.check_alive("node3", h.pid))
        # the kernel's OOM killer, say: SIGKILL to the worker python only
        launcher.pool.get("node3").run(["kill", "-9", str(worker_pid)], check=True)
        st = wait_stage(run, "inspect", attempt, launcher, h.host, h.pid, poll_s=0.1)
        assert st["state"] == StageState.FAILED_WORKER.value
        assert st["signal"] == signal.SIGKILL and st["error_class"] == "killed" and st["host"] == "node3"
        assert launcher.exit_code(h.pid) == -9
    finally:
        launcher.close()
    return run


def test_terminate_by_the_worker_pid_stops_its_whole_session(sshd_cluster):
    """cancel knows the pid status.json records (the python worker): terminate signals its process group."""
    c = sshd_cluster
    launcher = SSHLauncher(c.cluster_dict(), module="tests.integration.ticker_worker")
    run_dir = c.work_dir / "runs" / "t"
    try:
        h = launcher.start(WorkerSpec(run_dir=str(run_dir), stage="tick", node="node1",
                                      args=("--count", "600", "--interval", "0.05")))
        follower = StageFollower(launcher, str(run_dir / "stages" / "tick"))
        ev = wait_for(lambda: [e for e in follower.poll().events if e.kind == "state"])
        worker_pid = ev[0].data["pid"]
        assert worker_pid != h.pid and launcher.check_alive("node1", worker_pid)
        launcher.terminate("node1", worker_pid, signal.SIGTERM)
        wait_for(lambda: not launcher.check_alive("node1", worker_pid) and not launcher.check_alive("node1", h.pid))
        launcher.terminate("node1", worker_pid, signal.SIGTERM)  # gone already: a no-op, not an error
    finally:
        launcher.close()
