"""A real `quantdeck convert` process killed with SIGKILL mid-run, then run again: finished shards are kept and
the final files are byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.convert import convert_checkpoint
from tests.conftest import subprocess_env
from tests.fixtures_ckpt import tiny_ckpt  # noqa: F401


def _cmd(src, dst):
    return [sys.executable, "-m", "console", "convert", "--src", str(src), "--dst", str(dst), "--to", "nvfp4",
            "--shard-size", "30KB", "--device", "cpu"]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_is_byte_identical(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    ref = convert_checkpoint(src, tmp_path / "ref", to="nvfp4", shard_size="30KB")
    assert ref["shards"] >= 4
    dst = tmp_path / "out"
    env = subprocess_env(QUANTDECK_TEST_ITEM_DELAY_S="0.1")
    proc = subprocess.Popen(_cmd(src, dst), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = tmp_path / "out.partial" / "manifest.json"
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads(manifest.read_text())["shards"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists() and (tmp_path / "out.partial").is_dir()
    assert 2 <= done < ref["shards"]

    res = subprocess.run(_cmd(src, dst) + ["--json"], env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["shards_kept"] >= 2 and summary["shards_written"] == ref["shards"] - summary["shards_kept"]
    assert not (tmp_path / "out.partial").exists()
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in dst.iterdir())
    for name in names:
        if name == "manifest.json":
            continue
        assert (tmp_path / "ref" / name).read_bytes() == (dst / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "ref", dst))
    assert a["shards"] == b["shards"] and a["weight_map"] == b["weight_map"]
