"""A real `quantdeck convert` process killed with SIGKILL mid-run, then run again: finished shards are kept and
the final files are byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from engine.convert import convert_checkpoint
from engine.core.settings import fault_spec
from tests.conftest import subprocess_env


def _cmd(src, dst):
    return [sys.executable, "-m", "console", "convert", "--src", str(src), "--dst", str(dst), "--to", "nvfp4",
            "--shard-size", "30KB", "--device", "cpu"]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_is_byte_identical(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    ref = convert_checkpoint(src, tmp_path / "ref", to="nvfp4", shard_size="30KB")
    assert ref["shards"] >= 4
    dst = tmp_path / "out"
    env = subprocess_env(QUANTDECK_FAULTS=fault_spec(item_delay_s=0.1))
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
    _assert_same_output(tmp_path / "ref", dst)


def _assert_same_output(ref, dst):
    """Every file byte-identical; the manifests record the same shards and weight map."""
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in dst.iterdir())
    for name in names:
        if name == "manifest.json":
            continue
        assert (ref / name).read_bytes() == (dst / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (ref, dst))
    assert a["shards"] == b["shards"] and a["weight_map"] == b["weight_map"]


def _recorded_shards(partial) -> int:
    try:
        return len(json.loads((partial / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _live(pids) -> list[int]:
    """Those of `pids` still running (a zombie waiting for a reaper runs nothing)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _cmdline(p: psutil.Process) -> str:
    """A child's command line, or "" for one that ended meanwhile (gone, or a zombie not yet reaped)."""
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


@pytest.mark.slow
def test_kill_9_of_the_parent_takes_its_workers_along_and_a_rerun_is_byte_identical(tiny_ckpt, tmp_path):
    """`--workers 2`, parent killed with SIGKILL: its worker processes die with it instead of writing on into
    DST.partial/ beside the next run; running the same command again gives the clean run's bytes."""
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    ref = convert_checkpoint(src, tmp_path / "ref", to="nvfp4", shard_size="30KB")
    dst, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = _cmd(src, dst) + ["--workers", "2"]
    # one writer thread a worker, 0.3 s after each item: the workers have many seconds of work left at the kill
    env = subprocess_env(QUANTDECK_FAULTS=fault_spec(item_delay_s=0.3), QUANTDECK_WRITERS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parent = psutil.Process(proc.pid)
    workers: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        workers = [c.pid for c in parent.children() if "spawn_main" in _cmdline(c)]
        if len(workers) == 2 and _recorded_shards(partial) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None and len(workers) == 2, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while _live(workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = _live(workers)
    for pid in orphans:  # a failing run must not leave them writing on
        os.kill(pid, signal.SIGKILL)
    assert orphans == [], "convert workers outlived their parent"
    done = _recorded_shards(partial)
    assert 1 <= done < ref["shards"] and not dst.exists()

    res = subprocess.run(cmd + ["--json"], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["shards_kept"] >= done
    _assert_same_output(tmp_path / "ref", dst)
