"""torchrun spanning the four sshd nodes (gloo), started by the torchrun launcher; a node that cannot start."""

from __future__ import annotations

import json
import time

import pytest

from engine.core.errors import RemoteError
from engine.runs.launcher import WorkerSpec
from remote.launchers import SSHLauncher, TorchrunLauncher


@pytest.mark.slow
def test_torchrun_spans_four_nodes_with_gloo(sshd_cluster):
    c = sshd_cluster
    launcher = TorchrunLauncher(c.cluster_dict(), module="tests.integration.allreduce_worker")
    run_dir = c.work_dir / "runs" / "tr"
    try:
        h = launcher.start(WorkerSpec(run_dir=str(run_dir), stage="calibrate", nnodes=4))
        assert h.host == "node0" and list(h.node_pids) == ["node0", "node1", "node2", "node3"]
        deadline = time.monotonic() + 90
        while any(launcher.check_alive(n, p) for n, p in h.node_pids.items()):
            assert time.monotonic() < deadline, (run_dir / "stages" / "calibrate" / "log.txt").read_text()[-3000:]
            time.sleep(0.3)
        assert {n: launcher.exit_status(n, p) for n, p in h.node_pids.items()} == dict.fromkeys(h.node_pids, 0)
        ranks = [json.loads((run_dir / "stages" / "calibrate" / f"rank{r}.json").read_text()) for r in range(4)]
        assert all(r["world"] == 4 and r["sum"] == 10.0 for r in ranks)
        assert sorted((r["node_rank"], r["node"]) for r in ranks) == [(0, "node0"), (1, "node1"), (2, "node2"),
                                                                      (3, "node3")]
        assert (run_dir / "stages" / "calibrate" / "log.node3.txt").exists()
    finally:
        launcher.close()


def test_a_node_that_cannot_start_is_named_and_the_others_are_stopped(sshd_cluster):
    c = sshd_cluster
    launcher = SSHLauncher(c.cluster_dict(connect_timeout=2.0), module="tests.integration.allreduce_worker")
    c.node("node2").kill()
    try:
        with pytest.raises(RemoteError) as ei:
            launcher.start(WorkerSpec(run_dir=str(c.work_dir / "runs" / "bad"), stage="calibrate", nnodes=4))
        err = ei.value
        assert err.at == "node2" and "node node2 failed to start" in err.msg
        assert "node0, node1" in err.hint
        started = {k[0]: k[1] for k in launcher._exit_files}
        assert set(started) == {"node0", "node1"}
        time.sleep(0.3)
        assert not any(launcher.check_alive(n, p) for n, p in started.items())  # stopped, not left hanging
    finally:
        launcher.close()


@pytest.mark.slow
def test_distributed_stage_on_one_multi_gpu_node_gets_a_rank_per_gpu(sshd_cluster):
    """`calibrate` is a distributed stage: on one node declaring 2 GPUs the SSH launcher runs torchrun with
    2 ranks there (gloo here, NCCL on a GPU node) instead of one process."""
    c = sshd_cluster
    d = c.cluster_dict()
    d["nodes"][1]["gpus"] = 2
    launcher = SSHLauncher(d, module="tests.integration.allreduce_worker")
    run_dir = c.work_dir / "runs" / "one"
    try:
        h = launcher.start(WorkerSpec(run_dir=str(run_dir), stage="calibrate", node="node1"))
        deadline = time.monotonic() + 90
        while launcher.check_alive(h.host, h.pid):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert launcher.exit_status(h.host, h.pid) == 0, (run_dir / "stages/calibrate/log.txt").read_text()[-2000:]
    finally:
        launcher.close()
    ranks = [json.loads((run_dir / "stages" / "calibrate" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["node"] == "node1" for r in ranks)
