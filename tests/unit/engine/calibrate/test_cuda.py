"""On CUDA: streaming calibration on one GPU, and 2 ranks with NCCL, against modelopt's whole-model flow."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from calib_tiny_models import assert_amax_equal, reference_quantized_model

from engine.calibrate import snapshot as snap
from engine.calibrate.layer_pass import layer_amax
from engine.calibrate.samples import load_samples
from engine.calibrate.streaming import calibrate

pytestmark = pytest.mark.requires_gpu
REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def test_one_gpu_matches_modelopt(v3_dir, samples_file, tmp_path):
    out = tmp_path / "amax"
    assert calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=2, device="cuda")["finished"]
    s = load_samples(samples_file, tokenizer=v3_dir, seq_len=24)
    ref = layer_amax(reference_quantized_model(v3_dir, s.input_ids, batch_size=2, device="cuda"))
    assert_amax_equal(ref, snap.load_amax(out))


def test_two_gpus_nccl_match_modelopt(v3_dir, samples_file, tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import os

    out = tmp_path / "amax"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "console",
                        "calibrate", "--model", str(v3_dir), "--samples", str(samples_file), "--out", str(out),
                        "--seq-len", "24", "--batch-size", "2", "--device", "cuda", "--quiet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = load_samples(samples_file, tokenizer=v3_dir, seq_len=24)
    ref = layer_amax(reference_quantized_model(v3_dir, s.input_ids, batch_size=2, world_size=2, device="cuda"))
    assert_amax_equal(ref, snap.load_amax(out))
