"""convert / export with the output shards split over real torchrun ranks (gloo, CPU), engine.convert.ranks:
the bytes of one process; a rank that fails fails the stage with its error, nothing is finalized, and a rerun
keeps the shards the other rank finished and completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.core.names import StageState

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("rank_share_worker.py")
LAYOUTS = ("modelopt", "compressed-tensors")
SHARD = "100KB"  # the tiny V3 fixture in 12-14 shards per layout


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def rank_lines(stdout: str) -> list[dict]:
    """Each rank's JSON line of rank_share_worker, in rank order (torchrun merges the ranks' stdout)."""
    found, dec = [], json.JSONDecoder()
    for line in stdout.splitlines():
        i = line.find('{"rank"')
        while i >= 0:
            obj, end = dec.raw_decode(line, i)
            found.append(obj)
            i = line.find('{"rank"', end)
    return sorted(found, key=lambda d: d["rank"])


def last_progress(path: Path, attempt: int) -> dict:
    """The last progress event a rank wrote in `attempt` (after its `state: RUNNING` event of that attempt)."""
    last, cur = None, None
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["kind"] == "state" and e.get("state") == "RUNNING":
            cur = e.get("attempt")
        elif e["kind"] == "progress" and cur == attempt:
            last = e
    assert last is not None, f"no progress of attempt {attempt} in {path}"
    return last


def torchrun(nproc: int, job: dict, **env: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(WORKER),
           json.dumps(job)]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=400, cwd=str(REPO))


@pytest.fixture(scope="module")
def amax_snapshot(tiny_ckpt, tmp_path_factory):
    """A real amax snapshot of the tiny bf16 V3 fixture (8 samples, one process)."""
    from engine.calibrate.streaming import calibrate

    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    d = tmp_path_factory.mktemp("rank-share-amax")
    samples = d / "samples.json"
    samples.write_text(json.dumps([f"sample {i}: the quick brown fox {'jumps ' * i}over the lazy dog"
                                   for i in range(8)]))
    calibrate(src, samples, d / "amax", num_samples=8, seq_len=16, all_experts=True, device="cpu")
    return src, d / "amax"


@pytest.mark.slow
def test_two_ranks_write_the_bytes_of_one_process(tiny_ckpt, amax_snapshot, tmp_path):
    from engine.convert import convert_checkpoint
    from engine.export.api import export_checkpoint

    fp8 = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    bf16, amax = amax_snapshot
    one, two = tmp_path / "one", tmp_path / "two"
    conv = convert_checkpoint(fp8, one / "convert", layouts=LAYOUTS, device="cpu", shard_size=SHARD)
    exp = export_checkpoint(bf16, amax, one / "export", layouts=LAYOUTS, device="cpu", shard_size=SHARD)
    assert conv["shards"] >= 4
    r = torchrun(2, {"shard": SHARD, "convert": [str(fp8), str(two / "convert")],
                     "export": [str(bf16), str(amax), str(two / "export")]})
    assert r.returncode == 0, "\n".join(ln for ln in r.stderr.splitlines() if "Warning" not in ln)[-6000:]
    per_rank = rank_lines(r.stdout)
    assert [d["rank"] for d in per_rank] == [0, 1]
    # each rank wrote part of the tensors, together all of them
    assert all(d["convert"] > 0 and d["export"] > 0 for d in per_rank), per_rank
    assert sum(d["convert"] for d in per_rank) == conv["items"]
    want, got = tree(one), tree(two)
    assert want.keys() == got.keys() and any(k.endswith(".safetensors") for k in want)
    assert [k for k in want if want[k] != got[k]] == []
    assert not list(tmp_path.rglob("*.partial")) and exp["outputs"]


@pytest.mark.slow
def test_a_failing_rank_fails_the_stage_with_its_error_and_a_rerun_completes(tiny_ckpt, tmp_path, monkeypatch):
    """The convert stage of a run as 2 local ranks ([cluster] gpus_per_node = 2): rank 1 fails (the test hook
    QUANTDECK_FAULTS fail_rank) → the stage FAILED with rank 1's error, nothing finalized, rank 0's shards kept;
    the rerun writes the rest and gives the bytes of one process."""
    from engine.checkpoint.manifest import load_manifest
    from engine.convert import convert_checkpoint
    from engine.core.settings import fault_spec
    from engine.runs.launcher import WorkerSpec
    from engine.runs.local_launcher import LocalLauncher
    from engine.runs.plan import Plan
    from engine.runs.rundir import begin_attempt, read_status, set_status
    from engine.runs.runner import create_run, wait_stage

    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    out = tmp_path / "work" / "out"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[run]\nworkdir = "{tmp_path / "work"}"\n\n[source]\npath = "{src}"\n\n'
                      f'[target]\nformat = "nvfp4"\nlayouts = ["modelopt", "compressed-tensors"]\nshard_mb = 0.1\n'
                      f'output = "{out}"\n\n[cluster]\ngpus_per_node = 2\n')
    run = create_run(recipe)
    sp = Plan.from_json(run.read_plan()).stage("convert")
    assert sp.distributed and sp.nodes == ()
    launcher = LocalLauncher()

    def run_convert(env: dict[str, str]) -> dict:
        attempt = begin_attempt(run, "convert", launcher=launcher.name)
        h = launcher.start(WorkerSpec(run_dir=str(run.path), stage="convert", env=env, nproc_per_node=2,
                                      log_path=str(run.log_path("convert"))))
        set_status(run, "convert", StageState.STARTING, attempt=attempt, host=h.host, pid=h.pid)
        return wait_stage(run, "convert", attempt, launcher, h.host, h.pid, poll_s=0.1)

    st = run_convert({"QUANTDECK_FAULTS": fault_spec(fail_rank=1), "OMP_NUM_THREADS": "1"})
    log = run.log_path("convert").read_text()
    assert st["state"] == StageState.FAILED.value, (st, log[-3000:])
    assert st["error"].startswith("RankFailedError: rank 1 of 2 on ")
    assert "test hook QUANTDECK_FAULTS fail_rank" in st["error"]
    assert not any((out / lay).exists() for lay in LAYOUTS)  # nothing finalized
    kept = {lay: set(load_manifest(out / f"{lay}.partial")["shards"]) for lay in LAYOUTS}
    assert kept["modelopt"] and kept["modelopt"] == kept["compressed-tensors"]  # rank 0's share, in both layouts
    assert "rank 1" in log and read_status(run, "convert")["attempt"] == 1

    st = run_convert({"OMP_NUM_THREADS": "1"})
    assert st["state"] == StageState.SUCCEEDED.value, (st, run.log_path("convert").read_text()[-3000:])
    assert st["result"]["shards_kept"] == len(kept["modelopt"]) and st["result"]["shards_written"] > 0
    events = [json.loads(line) for line in run.events_path("convert", 1).read_text().splitlines()]
    assert any(e["kind"] == "progress" and e.get("done", 0) > 0 for e in events)  # rank 1 wrote shards
    # the stage's progress is both ranks' (this attempt's) shares summed, each rank's share listed
    shares = {r: last_progress(run.events_path("convert", r), attempt=2) for r in (0, 1)}
    assert all(sh["total"] > 0 for sh in shares.values()), shares
    from tests.integration.runs_support import qd

    res = qd("status", run.path, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    prog = next(s for s in json.loads(res.stdout)["stages"] if s["name"] == "convert")["progress"]
    assert prog["world"] == 2 and prog["total"] == sum(sh["total"] for sh in shares.values()) == prog["done"]
    assert prog["bytes_total"] == sum(sh["bytes_total"] for sh in shares.values())
    assert [(r["rank"], r["done"], r["total"]) for r in prog["ranks"]] == [(r, shares[r]["done"], shares[r]["total"])
                                                                           for r in (0, 1)]
    from engine.api import StageRanks, open_engine  # what `quantdeck run` prints while following: the same sum

    sr, merged = StageRanks(), {}
    open_engine().follow(str(run.path), lambda ev: merged.update({ev.stage: sr.feed(ev) or merged.get(ev.stage)}))
    assert (merged["convert"]["total"], merged["convert"]["world"]) == (prog["total"], 2)
    from console.api_backend import ApiBackend  # the console's stage row and ranks line
    from console.format import rank_line

    row = ApiBackend(open_engine()).read_run(str(run.path)).stage("convert")
    assert (row.done, row.total, row.ranks) == (prog["total"], prog["total"], 2)
    assert rank_line(row.rank_parts, row.ranks).startswith(f"ranks 2: r0 {shares[0]['done']}/{shares[0]['total']} ")
    monkeypatch.setenv("QUANTDECK_FSYNC", "1")  # durable shards, as a worker started by hand writes them
    ref = convert_checkpoint(src, tmp_path / "one", layouts=LAYOUTS, device="cpu", shard_size=SHARD)
    assert ref["shards"] == st["result"]["shards"]
    want, got = tree(tmp_path / "one"), tree(out)
    assert want.keys() == got.keys() and [k for k in want if want[k] != got[k]] == []


@pytest.mark.requires_gpu
def test_two_gpu_ranks_write_the_bytes_of_one_gpu_process(tiny_ckpt, amax_snapshot, tmp_path):
    """On a machine with two GPUs: convert and export as 2 torchrun ranks, each on its own GPU (cuda:LOCAL_RANK),
    give the bytes of one process on one GPU."""
    import torch

    from engine.convert import convert_checkpoint
    from engine.export.api import export_checkpoint

    assert torch.cuda.device_count() >= 2, "needs two GPUs"
    fp8 = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    bf16, amax = amax_snapshot
    one, two = tmp_path / "one", tmp_path / "two"
    convert_checkpoint(fp8, one / "convert", layouts=LAYOUTS, device="cuda", shard_size=SHARD)
    export_checkpoint(bf16, amax, one / "export", layouts=LAYOUTS, device="cuda", shard_size=SHARD)
    r = torchrun(2, {"shard": SHARD, "device": "cuda", "convert": [str(fp8), str(two / "convert")],
                     "export": [str(bf16), str(amax), str(two / "export")]})
    assert r.returncode == 0, "\n".join(ln for ln in r.stderr.splitlines() if "Warning" not in ln)[-6000:]
    per_rank = rank_lines(r.stdout)
    assert len(per_rank) == 2 and all(d["convert"] > 0 and d["export"] > 0 for d in per_rank), per_rank
    want, got = tree(one), tree(two)
    assert want.keys() == got.keys() and [k for k in want if want[k] != got[k]] == []


@pytest.mark.slow
def test_a_failing_rank_on_another_node_fails_the_stage_by_name(sshd_cluster, tiny_ckpt, tmp_path, monkeypatch):
    """convert as torchrun over the four sshd nodes; rank 3 (node3) fails → the stage FAILED on the head with
    rank 3's error naming node3, nothing finalized, the other ranks' shards kept, no torchrun left running."""
    import time

    from engine.checkpoint.manifest import load_manifest
    from engine.core.settings import fault_spec
    from engine.runs.launcher import WorkerSpec
    from engine.runs.plan import Plan
    from engine.runs.rundir import begin_attempt, set_status
    from engine.runs.runner import create_run, load_frozen_recipe, wait_stage
    from remote.launchers import launcher_for
    from tests.integration.test_remote_pipeline import HEAD, recipe_text

    c = sshd_cluster
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(c.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(c.ssh_config))
    recipe = tmp_path / "remote.toml"
    recipe.write_text(recipe_text(c.work_dir, tiny_ckpt("deepseek-v3", "fp8", mtp=True), c))
    run = create_run(recipe)
    sp = Plan.from_json(run.read_plan()).stage("convert")
    assert sp.distributed and len(sp.nodes) == 4
    launcher = launcher_for(load_frozen_recipe(run), run.path)
    try:
        attempt = begin_attempt(run, "convert", launcher=launcher.name)
        h = launcher.start(WorkerSpec(run_dir=str(run.path), stage="convert", nnodes=4,
                                      env={"QUANTDECK_FAULTS": fault_spec(fail_rank=3)},
                                      log_path=str(run.log_path("convert"))))
        set_status(run, "convert", StageState.STARTING, attempt=attempt, host=h.host, pid=h.pid)
        st = wait_stage(run, "convert", attempt, launcher, h.host, h.pid, poll_s=0.1)
        assert st["state"] == StageState.FAILED.value and st["host"] == HEAD, st
        assert st["error"].startswith("RankFailedError: rank 3 of 4 on node3 failed: RuntimeError: test hook"), st
        out = Path(sp.params["dst"])
        assert not any((out / lay).exists() for lay in LAYOUTS)
        man = load_manifest(out / "modelopt.partial")
        planned = man["planned_shards"]
        assert len(planned) >= 8 and set(man["shards"]) == {n for i, n in enumerate(planned) if i % 4 != 3}
        deadline = time.monotonic() + 60
        while any(launcher.check_alive(n, p) for n, p in h.node_pids.items()):  # every node's torchrun ended
            assert time.monotonic() < deadline, h.node_pids
            time.sleep(0.2)
    finally:
        launcher.close()
