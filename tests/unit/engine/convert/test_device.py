"""Where a conversion runs (engine.convert.device), and that a CPU NVFP4 conversion runs without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.convert import device as dv
from engine.core.errors import UsageError

REPO = Path(__file__).resolve().parents[4]
# Run the converter's entry point in a process where `import torch` fails: the CPU path must not need it.
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from engine.convert.__main__ import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_asked_devices_are_kept_and_unknown_ones_refused():
    assert dv.choose_device("cpu").device == "cpu"
    assert dv.choose_device("CUDA:1").device == "cuda:1"
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        dv.choose_device("tpu")
    with pytest.raises(UsageError):
        dv.choose_device("cuda:x")


def test_auto_prefers_the_cpu_kernels_on_many_cores_for_nvfp4(monkeypatch):
    monkeypatch.setattr(dv, "nvidia_gpu_present", lambda: False)
    assert dv.choose_device("auto", "nvfp4", cores=2) == dv.DeviceChoice("cpu", "no NVIDIA GPU", "auto")
    monkeypatch.setattr(dv, "nvidia_gpu_present", lambda: True)
    many = dv.choose_device("auto", "nvfp4", cores=dv.AUTO_CPU_CORES)
    assert many.device == "cpu" and "--device cuda" in many.reason
    assert dv.choose_device("auto", "nvfp4", cores=dv.AUTO_CPU_CORES - 1).device == "cuda"
    assert dv.choose_device("auto", "fp8-block", cores=64).device == "cuda"  # its CPU math is torch's


def test_auto_takes_the_gpus_for_split_runs_and_torch_heavy_sources(monkeypatch):
    monkeypatch.setattr(dv, "nvidia_gpu_present", lambda: True)
    assert dv.choose_device("auto", "nvfp4", cores=64, split=8).device == "cuda"  # 8 ranks: a GPU each
    cpu = dv.choose_device("auto", "nvfp4", cores=64)
    assert cpu.device == "cpu" and cpu.gpu
    assert dv.needs_gpu_after_all(cpu, torch_bytes=600, total_bytes=1000)  # e.g. V4's MXFP4 experts
    assert not dv.needs_gpu_after_all(cpu, torch_bytes=50, total_bytes=1000)
    assert not dv.needs_gpu_after_all(dv.choose_device("cpu"), torch_bytes=600, total_bytes=1000)  # asked for
    monkeypatch.setattr(dv, "nvidia_gpu_present", lambda: False)
    assert not dv.needs_gpu_after_all(dv.choose_device("auto", cores=64), torch_bytes=600, total_bytes=1000)


def test_cores_are_the_ones_this_process_may_use(monkeypatch):
    monkeypatch.setattr(dv.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(dv.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(dv, "nvidia_gpu_present", lambda: True)
    assert dv.usable_cores() == 4
    assert dv.choose_device("auto", "nvfp4").device == "cuda"  # a 4-CPU cpuset on a 64-core GPU node


def test_cuda_asked_where_torch_sees_none_is_a_usage_error(tiny_ckpt, tmp_path):
    import torch

    from engine.convert import convert_checkpoint

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the GPU boxes; CI has none, so it runs there
    with pytest.raises(UsageError, match="--device cuda asked, but torch sees no CUDA device") as e:
        convert_checkpoint(tiny_ckpt("deepseek-v3", "fp8"), tmp_path / "o", device="cuda")
    assert e.value.hint == "use --device cpu or auto" and not (tmp_path / "o.partial").exists()


def test_a_torch_heavy_plan_turns_auto_back_to_the_gpu(tiny_ckpt, tmp_path, monkeypatch):
    """V4 as released (MXFP4 experts) on a many-core GPU machine: the plan sends auto to CUDA. torch here has
    no CUDA, so the run stays on the CPU and says why."""
    from engine.convert import convert_checkpoint
    from engine.core.events import CallbackSink

    monkeypatch.setattr(dv, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(dv, "usable_cores", lambda: 64)
    logs = []
    sink = CallbackSink(lambda ev: logs.append(ev.data.get("msg", "")) if ev.kind == "log" else None)
    src = tiny_ckpt("deepseek-v4", "fp8", hidden=320, experts=8, moe_inter=128)
    s = convert_checkpoint(src, tmp_path / "o", to="nvfp4", sink=sink)
    assert s["device"] == "cpu"
    assert any("device auto: torch sees no CUDA device" in m for m in logs), logs


def test_a_cpu_nvfp4_conversion_never_imports_torch(tiny_ckpt, tmp_path):
    from engine.convert import convert_checkpoint

    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True, hidden=320)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "no-torch"
    p = subprocess.run([sys.executable, "-c", NO_TORCH, "--src", str(src), "--dst", str(out), "--to", "nvfp4",
                        "--device", "cpu", "--format", "both", "--shard-size", "60KB"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["shards"] > 1
    ref = tmp_path / "in-process"  # this process has torch: the same bytes either way
    convert_checkpoint(src, ref, to="nvfp4", layouts=["modelopt", "compressed-tensors"], device="cpu",
                       shard_size="60KB")
    files = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        if f.name != "manifest.json":  # holds the run's times
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f
