"""The weight-only NVFP4 pipeline from a recipe over the four sshd nodes: same bytes as on one machine,
and an sshd killed under a running stage loses nothing (no failed attempt). convert (weight-only) and export
(calibrated) split their output shards over the four nodes' ranks."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.core.names import StageState
from engine.core.settings import fault_spec
from engine.runs.rundir import read_status
from tests.integration.runs_support import output_files

HEAD = "node2"


def recipe_text(workdir: Path, src: Path, cluster=None, samples: Path | None = None) -> str:
    layouts = '"modelopt", "compressed-tensors"' if samples is None else '"modelopt"'
    text = (f'[run]\nworkdir = "{workdir}"\n\n[source]\npath = "{src}"\n\n'
            f'[target]\nformat = "nvfp4"\nlayouts = [{layouts}]\nshard_mb = 0.1\n')  # 12-14 shards to share
    if samples is not None:  # calibrated W4A4: 8 samples, 2 per rank over four nodes
        text += (f'calibrate = true\n\n[calibration]\nsamples = "{samples}"\nnum_samples = 8\nseq_len = 16\n'
                 f'all_experts = true\n\n[eval]\nenable = false\n')  # all 8 are calibrated on: none held out
    if cluster is not None:
        text += f'\n[cluster]\nhead = "{HEAD}"\npython = "{sys.executable}"\n'
        for n in cluster.cluster_dict()["nodes"]:
            text += (f'\n[[cluster.nodes]]\nname = "{n["name"]}"\nhost = "{n["host"]}"\nport = {n["port"]}\n'
                     f'user = "{n["user"]}"\nkey = "{n["key"]}"\n')
    return text


def hosts_that_wrote(run, stage: str) -> dict[int, str]:
    """{rank: node} of the ranks whose events show tensors written (progress done > 0)."""
    out = {}
    for path in run.events_paths(stage):
        for line in path.read_text().splitlines():
            e = json.loads(line)
            if e.get("kind") == "progress" and (e.get("done") or 0) > 0:
                out[e["rank"]] = e["host"]
    return out


@pytest.mark.slow
def test_weight_only_pipeline_over_four_nodes_is_byte_identical(sshd_cluster, tiny_ckpt, tmp_path, monkeypatch):
    """A worker killed on node3 is recorded failed; `resume` then runs the rest on the head, whose sshd dies
    and comes back under the running convert stage (no failed attempt for it); the outputs equal a local run."""
    import signal

    from engine.runs.launcher import WorkerSpec
    from engine.runs.local_launcher import LocalLauncher
    from engine.runs.rundir import begin_attempt
    from engine.runs.runner import create_run, drive, load_frozen_recipe, wait_stage
    from engine.runs.store import Store, sync_run
    from remote.launchers import SSHLauncher, launcher_for

    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    local_recipe = tmp_path / "local.toml"
    local_recipe.write_text(recipe_text(tmp_path / "local-work", src))
    local_run = create_run(local_recipe)
    t0 = time.monotonic()
    assert drive(local_run, launcher=LocalLauncher(), poll_s=0.1) == "SUCCEEDED"
    print(f"local pipeline {time.monotonic() - t0:.1f}s")
    t0 = time.monotonic()

    c = sshd_cluster
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(c.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(c.ssh_config))
    remote_recipe = tmp_path / "remote.toml"
    remote_recipe.write_text(recipe_text(c.work_dir, src, c))
    run = create_run(remote_recipe)
    launcher = launcher_for(load_frozen_recipe(run), run.path)
    assert isinstance(launcher, SSHLauncher)

    # 1. the inspect worker, parked by the worker's test hook on node3, is SIGKILLed there (an OOM kill, say)
    attempt = begin_attempt(run, "inspect", launcher=launcher.name)
    h = launcher.start(WorkerSpec(run_dir=str(run.path), stage="inspect", node="node3",
                                  log_path=str(run.log_path("inspect")),
                                  env={"QUANTDECK_FAULTS": fault_spec(pause_stage="inspect")}))
    deadline = time.monotonic() + 60
    while not (run.stage_dir("inspect") / "test-paused").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    launcher.pool.get("node3").run(["kill", "-9", str(read_status(run, "inspect")["pid"])], check=True)
    st = wait_stage(run, "inspect", attempt, launcher, h.host, h.pid, poll_s=0.1)
    assert (st["state"], st["error_class"], st["signal"], st["host"]) == (
        StageState.FAILED_WORKER.value, "killed", signal.SIGKILL, "node3")

    # 2. resume; the head's sshd dies while the convert stage runs there, and comes back
    result: dict[str, str] = {}
    driver = threading.Thread(target=lambda: result.setdefault("r", drive(run, "resume", launcher=launcher,
                                                                          poll_s=0.1)))
    driver.start()
    deadline = time.monotonic() + 120
    while read_status(run, "convert")["state"] != StageState.RUNNING.value \
            or not run.events_path("convert", 1).exists():  # every node's torchrun has started its rank
        assert time.monotonic() < deadline and driver.is_alive(), result
        time.sleep(0.02)
    c.node(HEAD).kill()
    time.sleep(1.0)
    c.node(HEAD).start()
    driver.join(timeout=240)
    assert not driver.is_alive()
    print(f"remote pipeline {time.monotonic() - t0:.1f}s")
    assert result["r"] == "SUCCEEDED", [(n, read_status(run, n).get("state"), read_status(run, n).get("error"),
                                          run.log_path(n).read_text()[-1500:] if run.log_path(n).exists() else "")
                                         for n in run.stage_names()]

    for stage in run.stage_names():
        st = read_status(run, stage)
        assert st["state"] == StageState.SUCCEEDED.value, (stage, st)
        assert st["attempt"] == (2 if stage == "inspect" else 1), (stage, st)
        assert st["host"] == HEAD  # every single-node stage ran on the head, through SSH
    with Store() as store:
        sync_run(store, run.path)
        attempts = [(a.stage, a.attempt, a.state) for a in store.attempts(run.id)]
    failed = [a for a in attempts if a[2] != StageState.SUCCEEDED.value]
    assert failed == [("inspect", 1, StageState.FAILED_WORKER.value)], attempts  # none from the lost sshd
    # convert split its shards over the four nodes: every rank wrote some (rank 0 on the head)
    assert hosts_that_wrote(run, "convert") == {0: HEAD, 1: "node0", 2: "node1", 3: "node3"}

    local, remote = output_files(tmp_path / "local-work"), output_files(c.work_dir)
    assert local.keys() == remote.keys() and any(k.endswith(".safetensors") for k in local)
    assert [k for k in local if local[k] != remote[k]] == []


@pytest.mark.slow
def test_calibrated_pipeline_torchrun_across_four_nodes_is_byte_identical(sshd_cluster, tiny_ckpt, tmp_path,
                                                                          monkeypatch):
    """calibrate runs as torchrun over the four nodes (gloo, 4 ranks) and gives the bytes of one rank here."""
    import json

    from engine.runs.local_launcher import LocalLauncher
    from engine.runs.runner import create_run, drive, load_frozen_recipe
    from remote.launchers import launcher_for

    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([f"sample {i}: the quick brown fox {'jumps ' * i}over the lazy dog"
                                   for i in range(8)]))
    local_recipe = tmp_path / "local.toml"
    local_recipe.write_text(recipe_text(tmp_path / "local-work", src, samples=samples))
    local_run = create_run(local_recipe)
    t0 = time.monotonic()
    assert drive(local_run, launcher=LocalLauncher(), poll_s=0.1) == "SUCCEEDED"
    print(f"local calibrated pipeline {time.monotonic() - t0:.1f}s")

    c = sshd_cluster
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(c.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(c.ssh_config))
    remote_recipe = tmp_path / "remote.toml"
    remote_recipe.write_text(recipe_text(c.work_dir, src, c, samples=samples))
    run = create_run(remote_recipe)
    t0 = time.monotonic()
    result = drive(run, launcher=launcher_for(load_frozen_recipe(run), run.path), poll_s=0.1)
    print(f"remote calibrated pipeline {time.monotonic() - t0:.1f}s")
    assert result == "SUCCEEDED", [(n, read_status(run, n).get("state"), read_status(run, n).get("error"),
                                    run.log_path(n).read_text()[-1500:] if run.log_path(n).exists() else "")
                                   for n in run.stage_names()]
    st = read_status(run, "calibrate")
    assert st["host"] == HEAD, st
    logs = sorted(p.name for p in run.stage_dir("calibrate").glob("log*.txt"))
    assert logs == ["log.node0.txt", "log.node1.txt", "log.node3.txt", "log.txt"], logs
    assert sorted(p.name for p in run.stage_dir("calibrate").glob("events*.jsonl")) == [
        "events.jsonl", "events.rank1.jsonl", "events.rank2.jsonl", "events.rank3.jsonl"]
    assert hosts_that_wrote(run, "export") == {0: HEAD, 1: "node0", 2: "node1", 3: "node3"}  # shards split
    local, remote = output_files(tmp_path / "local-work"), output_files(c.work_dir)
    assert local.keys() == remote.keys() and any(k.endswith(".safetensors") for k in local)
    assert [k for k in local if local[k] != remote[k]] == []
