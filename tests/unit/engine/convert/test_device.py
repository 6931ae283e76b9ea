"""Where a conversion runs (engine.convert.device), and that a CPU NVFP4 conversion runs without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.convert import device as dv
from engine.errors import UsageError

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
