"""A real run, produced by the engine through engine.api on a tiny DeepSeek-V3 FP8 fixture, whose export
worker is killed with SIGKILL mid-stage: the state every key action of the console is tested against."""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RealRun:
    run_id: str
    root: Path
    home: Path
    workdir: Path

    def engine(self):
        from engine.api import open_engine

        return open_engine(str(self.workdir))


@contextmanager
def env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def calibrated_recipe(root: Path, ckpt: Path, samples: Path, *, num_samples: int, seq_len: int) -> dict:
    """A calibrated W4A4 NVFP4 recipe (modelopt layout) working under `root`."""
    return {"run": {"workdir": str(root / "work")}, "source": {"path": str(ckpt)},
            "target": {"format": "nvfp4", "calibrate": True, "layouts": ["modelopt"], "output": str(root / "out")},
            "calibration": {"samples": str(samples), "num_samples": num_samples, "seq_len": seq_len},
            # the samples after the calibrated ones are held out for eval; a random tiny model passes only a loose gate
            "eval": {"num_samples": 4, "seq_len": seq_len, "max_kld_mean": 10.0, "min_top1": 0.0}}


def write_recipe(root: Path, ckpt: Path) -> Path:
    samples = root / "samples.json"
    samples.write_text(json.dumps([f"sample {i}: experts route tokens; quantize to nvfp4." for i in range(8)]))
    from engine.runs.recipe_toml import write_recipe

    recipe = write_recipe(root / "recipe.toml", calibrated_recipe(root, ckpt, samples, num_samples=4, seq_len=16))
    return recipe


def wait(cond, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def make_killed_run(root: Path, ckpt: Path) -> RealRun:
    """Start a calibrated run, SIGKILL its export worker once it runs, and wait for the driver to record it."""
    home, workdir = root / "home", root / "work"
    home.mkdir(parents=True, exist_ok=True)
    with env(QUANTDECK_HOME=str(home), QUANTDECK_WORKDIR=str(workdir)):
        from engine.api import open_engine

        eng = open_engine(str(workdir))
        run_id = eng.start(str(write_recipe(root, ckpt)), preflight=False)

        def export_pid():
            st = {s.name: s for s in eng.status(run_id).stages}
            e = st["export"]
            if st["calibrate"].state in ("FAILED", "FAILED_WORKER", "CANCELLED"):
                raise AssertionError(f"calibrate failed: {st['calibrate'].error}")
            return e.pid if e.state == "RUNNING" and e.pid else None

        pid = wait(export_pid, 240, "the export stage to run")
        # its first log line ("stage export of run ...") comes just after it records its pid: killed between the
        # two (CI saw it on loaded cores), the console tests would find an empty export log
        wait(lambda: "stage export" in eng.log(run_id, "export")[0], 120, "the export stage's first log line")
        os.kill(pid, signal.SIGKILL)
        wait(lambda: (lambda v: not v.driver_alive and v.result != "RUNNING")(eng.status(run_id)), 60,
             "the driver to record the killed export")
    return RealRun(run_id, root, home, workdir)
