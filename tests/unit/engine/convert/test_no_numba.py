"""A CPU conversion with the C kernels (engine.formats.native) never imports numba: its import costs seconds on
a cold machine (engine.formats.native.build)."""

from __future__ import annotations

import os
import subprocess
import sys


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
