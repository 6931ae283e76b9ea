"""`quantdeck demo --headless` (what `make demo` runs without a terminal) runs the whole pipeline to success and
exits 0; a failed run exits non-zero."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import subprocess_env


@pytest.mark.slow
def test_headless_demo_runs_every_stage_to_success(tmp_path):
    r = subprocess.run([sys.executable, "-m", "console.cli", "demo", "--headless", "--workspace", str(tmp_path / "ws")],
                       cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("inspect", "calibrate", "export", "inject-mtp", "copy-extras", "validate", "eval"):
        assert f"[{stage}] succeeded" in r.stderr, (stage, r.stderr[-3000:])
    assert "demo: run " in r.stderr and " succeeded in " in r.stderr
    assert (tmp_path / "ws" / "out" / "DeepSeek-V3-tiny-NVFP4" / "modelopt" / "model.safetensors.index.json").exists()
