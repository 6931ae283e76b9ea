"""A CPU conversion's start: with the C kernels (engine.formats.native) it never imports numba (seconds on a cold
machine, engine.formats.native.build), and it records the files it read for the next cold start
(engine.startup.startfiles)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy


def test_numba_is_not_imported_by_a_cpu_conversion_with_the_c_kernels(tiny_ckpt, tmp_path):
    """The point of the C kernels: a CPU conversion never pays numba's import (seconds on a cold machine)."""
    src = tiny_ckpt("deepseek-v3", "fp8")
    code = ("import sys; from engine.convert import convert_checkpoint; "
            f"s = convert_checkpoint({str(src)!r}, {str(tmp_path / 'out')!r}, to='nvfp4', device='cpu'); "
            "print('numba' in sys.modules, s['items'] > 0)")
    env = {k: v for k, v in os.environ.items() if k != "QUANTDECK_KERNELS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_a_cpu_conversion_records_its_start_files(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "fp8")
    lists = tmp_path / "lists"
    env = dict(os.environ, QUANTDECK_START_FILES=str(lists))
    r = subprocess.run([sys.executable, "-m", "engine.convert", "--src", str(src), "--dst", str(tmp_path / "out"),
                        "--to", "nvfp4", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    (listed,) = lists.glob("engine.convert-*.txt")
    files = listed.read_text().splitlines()
    assert os.path.realpath(numpy._core._multiarray_umath.__file__) in files
    assert any(f.endswith(".so") and "quantdeck" in f for f in files)  # the C kernels' library
    assert not any("torch" in f for f in files)  # the CPU path imports no torch
