"""On a GPU machine without sshd: one local node with its GPUs — the nvidia-smi parser equals NVML, and the
calibrated pipeline with `[cluster] gpus_per_node = N` (calibrate as N NCCL ranks, convert/export split over N GPU
ranks, all through torchrun from the local launcher) gives the bytes of a one-process run.

Carries requires_gpu (CI has no GPU and deselects it). Run it on a machine with two GPUs.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.integration.runs_support import calibrated_recipe_text, calibration_samples, output_files

pytestmark = pytest.mark.requires_gpu


def _gpus() -> int:
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        pytest.fail("requires_gpu test on a machine without CUDA")
    return n


def test_nvidia_smi_parser_matches_nvml(tmp_path, capsys):
    from remote.monitor import LocalProbe
    from remote.telemetry import NVIDIA_SMI_QUERY, parse_nvidia_smi_csv

    n = _gpus()
    text = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, check=True, timeout=30).stdout
    parsed = parse_nvidia_smi_csv(text)
    nvml = LocalProbe("local", str(tmp_path)).sample()
    with capsys.disabled():
        def row(g):
            return g.index, g.name, g.mem_used >> 20, g.mem_total >> 20, g.util, g.temp

        print("\nnvidia-smi:", [row(g) for g in parsed])
        print("NVML:      ", [row(g) for g in nvml.gpus])
    assert len(parsed) == len(nvml.gpus) == n
    assert [g.uuid for g in parsed] == [g.uuid for g in nvml.gpus]
    assert [g.name for g in parsed] == [g.name for g in nvml.gpus]
    assert [g.mem_total >> 20 for g in parsed] == [g.mem_total >> 20 for g in nvml.gpus]


def test_calibrated_pipeline_on_local_gpu_ranks_equals_one_process(tiny_ckpt, tmp_path, capsys):
    from engine.core.names import StageState
    from engine.runs.local_launcher import LocalLauncher
    from engine.runs.rundir import read_status
    from engine.runs.runner import create_run, drive

    n = _gpus()
    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    samples = calibration_samples(tmp_path)

    def recipe(workdir, ranks):
        text = calibrated_recipe_text(workdir, src, samples, ["modelopt", "compressed-tensors"], shard_mb=0.1)
        if ranks > 1:
            text += f'[cluster]\ngpus_per_node = {ranks}\n'
        p = tmp_path / f"r{ranks}.toml"
        p.write_text(text)
        return p

    times, runs = {}, {}
    for ranks in (1, n):
        t0 = time.monotonic()
        run = create_run(recipe(tmp_path / f"work{ranks}", ranks))
        res = drive(run, launcher=LocalLauncher(), poll_s=0.2)
        times[ranks] = time.monotonic() - t0
        logs = {s: run.log_path(s).read_text()[-2000:] for s in run.stage_names() if run.log_path(s).exists()}
        assert res == "SUCCEEDED", logs
        runs[ranks] = run
    multi = runs[n]
    events = {s: sorted(p.name for p in multi.stage_dir(s).glob("events*.jsonl"))
              for s in ("calibrate", "export")}
    with capsys.disabled():
        print(f"\ncalibrated pipeline: 1 process {times[1]:.1f}s, {n} GPU ranks {times[n]:.1f}s; events {events}")
    for s in ("calibrate", "export"):
        assert read_status(multi, s)["state"] == StageState.SUCCEEDED.value
        assert len(events[s]) == n, events

    a, b = output_files(tmp_path / "work1"), output_files(tmp_path / f"work{n}")
    assert a and a.keys() == b.keys() and [k for k in a if a[k] != b[k]] == []
