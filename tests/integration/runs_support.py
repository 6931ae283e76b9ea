"""Helpers for the runs integration tests: the real `quantdeck` CLI in subprocesses, recipes
on tiny fixtures, waiting on run dirs, and byte-level comparison of output trees."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.core.settings import fault_spec

REPO = Path(__file__).resolve().parents[2]
FAULTS = "QUANTDECK_FAULTS"


def pause(stage: str, units: int = 0) -> dict[str, str]:
    """The environment that parks `stage`'s worker after `units` units (engine.runs.worker's test hook)."""
    return {FAULTS: fault_spec(pause_stage=stage, pause_after_units=units)}


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e.pop(FAULTS, None)
    e.update(extra)
    return e


def qd(*args: str, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess:
    """Run `quantdeck ARGS` as a new user would (a fresh interpreter), capturing stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "console.cli", *map(str, args)], cwd=REPO, env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, src: Path | str, workdir: Path, output: Path, *, fmt: str = "nvfp4",
                 shard_mb: float = 0.1, extra: str = "") -> Path:
    path.write_text(f'''[run]
workdir = "{workdir}"
device = "cpu"
[source]
path = "{src}"
[target]
format = "{fmt}"
output = "{output}"
shard_mb = {shard_mb}
{extra}
''')
    return path


def run_id_of(proc: subprocess.CompletedProcess) -> str:
    first = proc.stdout.splitlines()[0] if proc.stdout else ""
    assert first.startswith("run "), (proc.returncode, proc.stdout, proc.stderr)
    return first.split()[1]


def wait_for(pred, timeout: float = 90, what: str = "condition", poll: float = 0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_dir(workdir: Path, rid: str) -> Path:
    return workdir / "runs" / rid


def status(workdir: Path, rid: str, stage: str) -> dict:
    return json.loads((run_dir(workdir, rid) / "stages" / stage / "status.json").read_text())


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
        return st[st.rfind(")") + 2] in "ZX"
    except OSError:
        return True


def wait_driver_done(workdir: Path, rid: str, timeout: float = 120) -> None:
    d = run_dir(workdir, rid) / "driver.json"
    wait_for(d.exists, timeout, "driver.json")
    pid = json.loads(d.read_text())["pid"]
    wait_for(lambda: pid_gone(pid), timeout, f"driver {pid} of run {rid} to end")


def wait_paused(workdir: Path, rid: str, stage: str, timeout: float = 90) -> None:
    """Wait for the stage's worker to park at the test pause point; fail at once if the run ended instead."""
    rd = run_dir(workdir, rid)
    marker = rd / "stages" / stage / "test-paused"

    def ready():
        if marker.exists():
            return True
        d = rd / "driver.json"
        if d.exists() and pid_gone(json.loads(d.read_text())["pid"]) and not marker.exists():
            sts = {p.parent.name: json.loads(p.read_text()) for p in rd.glob("stages/*/status.json")}
            bad = {k: (v["state"], v.get("error"))
                   for k, v in sts.items() if v["state"] not in ("SUCCEEDED", "PENDING")}
            raise AssertionError(f"run {rid} ended before {stage} paused: {bad}")
        return False

    wait_for(ready, timeout, f"{stage} worker to pause")


def kill_paused_worker(workdir: Path, rid: str, stage: str, timeout: float = 90) -> int:
    """Wait until the stage's worker parks at the test pause point, then kill -9 it; its pid."""
    marker = run_dir(workdir, rid) / "stages" / stage / "test-paused"
    wait_paused(workdir, rid, stage, timeout)
    pid = int(marker.read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    marker.unlink()
    return pid


def tree_digest(root: Path) -> dict[str, str]:
    """relative path → sha256 of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """relative path → (size, mtime_ns, sha256): to prove that nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def output_files(workdir: Path) -> dict[str, bytes]:
    """relative path → bytes of every file under `workdir/outputs` but the manifests (they hold timestamps)."""
    root = workdir / "outputs"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def calibration_samples(tmp_path: Path) -> Path:
    """The 8 short samples the calibrated pipeline tests calibrate on, and 2 more held out for the eval stage
    (a JSON list of strings)."""
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([f"sample {i}: the quick brown fox {'jumps ' * i}over the lazy dog"
                                   for i in range(10)]))
    return samples


def calibrated_recipe_text(workdir: Path | str, src: Path | str, samples: Path, layouts: list[str],
                           shard_mb: float | None = None) -> str:
    """A calibrated NVFP4 recipe of the tiny checkpoint `src` (8 samples × 16 tokens, all experts)."""
    lays = ", ".join(f'"{lay}"' for lay in layouts)
    return (f'[run]\nworkdir = "{workdir}"\n[source]\npath = "{src}"\n[target]\nformat = "nvfp4"\n'
            f'calibrate = true\nlayouts = [{lays}]\n' + (f"shard_mb = {shard_mb}\n" if shard_mb is not None else "")
            + f'[calibration]\nsamples = "{samples}"\nnum_samples = 8\nseq_len = 16\nall_experts = true\n'
            + '[eval]\nnum_samples = 2\nseq_len = 16\nmax_kld_mean = 10.0\nmin_top1 = 0.0\n')
