"""Outputs of one tiny DeepSeek-V3 (BF16, with an MTP layer) for the eval tests: its NVFP4 weight-only conversion in
both layouts, its FP8-block conversion and its calibrated W4A4 export in both layouts, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EVAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def f(x):\n    return x * 2  # code is text too",
    "Numbers: 3.14159 2.71828 1.41421",
    "hello world, this is a sample of text for eval",
]
CALIB_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Calibration needs a handful of varied prompts, some longer than others.",
    "def f(x):\n    return x * 2  # code is text too",
    "Numbers: 3.14159 2.71828 1.41421 and symbols !@#$%^&*()",
] * 4


@pytest.fixture(scope="session")
def eval_src(tiny_ckpt) -> Path:
    return tiny_ckpt("deepseek-v3", "bf16", mtp=True)


@pytest.fixture(scope="session")
def eval_samples(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("eval_samples") / "heldout.json"
    p.write_text(json.dumps(EVAL_TEXTS))
    return p


@pytest.fixture(scope="session")
def nvfp4_out(eval_src, tmp_path_factory) -> Path:
    """DST/modelopt and DST/compressed-tensors: one weight-only conversion."""
    from engine.convert import convert_checkpoint

    dst = tmp_path_factory.mktemp("eval_nvfp4") / "nv"
    convert_checkpoint(str(eval_src), str(dst), to="nvfp4", layouts=["modelopt", "compressed-tensors"],
                       device="cpu")
    return dst


@pytest.fixture(scope="session")
def fp8_out(eval_src, tmp_path_factory) -> Path:
    from engine.convert import convert_checkpoint

    dst = tmp_path_factory.mktemp("eval_fp8") / "fp8"
    convert_checkpoint(str(eval_src), str(dst), to="fp8-block", layouts=["modelopt"], device="cpu")
    return dst


@pytest.fixture(scope="session")
def w4a4_out(eval_src, tmp_path_factory) -> Path:
    """DST/modelopt and DST/compressed-tensors: one calibrated W4A4 export."""
    from engine.calibrate.streaming import calibrate
    from engine.export.api import export_checkpoint

    d = tmp_path_factory.mktemp("eval_w4a4")
    samples = d / "calib.json"
    samples.write_text(json.dumps(CALIB_TEXTS))
    calibrate(str(eval_src), str(samples), str(d / "amax"), seq_len=64, device="cpu")
    export_checkpoint(str(eval_src), str(d / "amax"), str(d / "w4"), layouts=["modelopt", "compressed-tensors"],
                      device="cpu")
    return d / "w4"
