"""On a GPU machine: one sshd node with its GPUs — telemetry over SSH equals NVML's, and torchrun with NCCL.

Carries requires_gpu (CI has no GPU and deselects it). Run it on a machine with two GPUs.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from engine.runs.launcher import WorkerSpec
from remote.hosts import cluster_from
from remote.launchers import TorchrunLauncher
from remote.monitor import LocalProbe, TelemetryMonitor
from remote.telemetry import NodeState
from tests.integration.runs_support import calibrated_recipe_text, calibration_samples, output_files
from tests.integration.sshd import start_cluster

pytestmark = pytest.mark.requires_gpu
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.fixture
def gpu_node(tmp_path):
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        pytest.fail("requires_gpu test on a machine without CUDA")
    cluster = start_cluster(tmp_path / "sshd", n=1)
    d = cluster.cluster_dict()
    d["nodes"][0]["gpus"] = n
    extra = os.environ.get("PYTHONPATH", "")
    d["env"] = {"PYTHONPATH": d["env"]["PYTHONPATH"] + (os.pathsep + extra if extra else ""), **NO_MULTICAST}
    for k in ("PATH", "LD_LIBRARY_PATH"):
        if os.environ.get(k):
            d["env"][k] = os.environ[k]
    try:
        yield cluster, d, n
    finally:
        cluster.stop()


def test_gpu_telemetry_over_ssh_matches_nvml(gpu_node, capsys):
    cluster, d, n = gpu_node
    mon = TelemetryMonitor.for_cluster(cluster_from(d), interval_s=1.0)
    try:
        remote = mon.poll_once("node0")
    finally:
        mon.close()
    local = LocalProbe("local", d["work_dir"]).sample()
    with capsys.disabled():
        print("\nSSH nvidia-smi:", [(g.index, g.name, g.mem_used >> 20, g.mem_total >> 20, g.util, g.temp, g.power)
                                    for g in remote.gpus])
        print("NVML:          ", [(g.index, g.name, g.mem_used >> 20, g.mem_total >> 20, g.util, g.temp, g.power)
                                  for g in local.gpus])
    assert remote.state is NodeState.OK and local.state is NodeState.OK, (remote.error, local.error)
    assert len(remote.gpus) == len(local.gpus) == n
    assert [g.uuid for g in remote.gpus] == [g.uuid for g in local.gpus]
    assert [g.name for g in remote.gpus] == [g.name for g in local.gpus]
    assert all(g.mem_total > 0 and g.temp is not None for g in remote.gpus)


def test_torchrun_with_nccl_on_one_node(gpu_node, capsys):
    cluster, d, n = gpu_node
    launcher = TorchrunLauncher(d, module="tests.integration.allreduce_worker")
    run_dir = cluster.work_dir / "runs" / "nccl"
    t0 = time.monotonic()
    try:
        h = launcher.start(WorkerSpec(run_dir=str(run_dir), stage="calibrate", env={"QD_TEST_BACKEND": "nccl"}))
        while launcher.check_alive(h.host, h.pid):
            assert time.monotonic() - t0 < 240
            time.sleep(0.5)
        log = (run_dir / "stages" / "calibrate" / "log.txt").read_text()
        assert launcher.exit_status(h.host, h.pid) == 0, log[-3000:]
    finally:
        launcher.close()
    ranks = [json.loads((run_dir / "stages" / "calibrate" / f"rank{r}.json").read_text()) for r in range(n)]
    with capsys.disabled():
        print(f"\nNCCL ranks ({time.monotonic() - t0:.1f}s):", ranks)
    assert all(r["world"] == n and r["sum"] == n * (n + 1) / 2 and r["backend"] == "nccl" for r in ranks)
    assert sorted(r["device"] for r in ranks) == [f"cuda:{i}" for i in range(n)]


def test_calibrated_pipeline_two_gpu_ranks_nccl_equals_one_rank(gpu_node, tiny_ckpt, tmp_path, capsys):
    """calibrate on one 2-GPU node: SSHLauncher runs torchrun with one rank per GPU (NCCL); the W4A4
    outputs equal a one-process run of the same recipe on this machine."""
    from engine.core.names import StageState
    from engine.runs.local_launcher import LocalLauncher
    from engine.runs.rundir import read_status
    from engine.runs.runner import create_run, drive
    from remote.launchers import SSHLauncher

    cluster, d, n = gpu_node
    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    samples = calibration_samples(tmp_path)

    def recipe(workdir, with_cluster):
        text = calibrated_recipe_text(workdir, src, samples, ["modelopt"])
        if with_cluster:
            nd = d["nodes"][0]
            text += (f'[cluster]\npython = "{d["python"]}"\n[[cluster.nodes]]\nname = "{nd["name"]}"\n'
                     f'host = "{nd["host"]}"\nport = {nd["port"]}\nkey = "{nd["key"]}"\ngpus = {n}\n')
        p = tmp_path / f"{'remote' if with_cluster else 'local'}.toml"
        p.write_text(text)
        return p

    t0 = time.monotonic()
    local = create_run(recipe(tmp_path / "local-work", False))
    assert drive(local, launcher=LocalLauncher(), poll_s=0.2) == "SUCCEEDED"
    t_local = time.monotonic() - t0
    t0 = time.monotonic()
    run = create_run(recipe(cluster.work_dir, True))
    launcher = SSHLauncher(d)  # the cluster's env carries PYTHONPATH and the NCCL multicast-off variables
    res = drive(run, launcher=launcher, poll_s=0.2)
    t_remote = time.monotonic() - t0
    logs = {s: run.log_path(s).read_text()[-2000:] for s in run.stage_names() if run.log_path(s).exists()}
    assert res == "SUCCEEDED", logs
    st = read_status(run, "calibrate")
    ranks = sorted(p.name for p in run.stage_dir("calibrate").glob("events*.jsonl"))
    with capsys.disabled():
        print(f"\ncalibrated pipeline: local 1 rank {t_local:.1f}s, ssh+torchrun {n} ranks NCCL {t_remote:.1f}s; "
              f"calibrate events {ranks}; status {st['state']} on {st['host']}")
    assert st["state"] == StageState.SUCCEEDED.value and len(ranks) == n

    a, b = output_files(tmp_path / "local-work"), output_files(cluster.work_dir)
    assert a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
