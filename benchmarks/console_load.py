"""Console load: `quantdeck console RUN` following a running stage, with replayed telemetry of 4 nodes × 8 GPUs
(real recorded nvidia-smi output) at 1 Hz, in a real terminal (tmux), for --seconds (default 60).

Prints the CPU time of the console process as a share of one core (target ≤ 10%) and the time from launch to
the first full frame (target ≤ 1.0 s): fleet rows (node0 and the stale node), the run's title, its calibrate
stage and the key line on screen; the median of --launches launches, each listed with its CPU time and the load
when it started, since on a shared machine one launch says little. Saves the tmux capture of the dashboard. The
run is real: a tiny calibrated DeepSeek-V3 FP8 fixture through engine.api, its calibrate stage running (loading
the cores) when the console first starts.

The console runs as an installed one does: its modules byte-compiled first (pip compiles at install; a
PYTHONDONTWRITEBYTECODE=1 environment would otherwise recompile them on every start), in place (__pycache__,
git-ignored). The screen is read through one tmux control-mode client (`tmux -C`, ignore-size) every 10 ms, not a
new tmux process per look, so that watching does not itself slow the console down on a loaded machine.

    .venv/bin/python benchmarks/console_load.py [--seconds 60] [--launches 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tmux(sock: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=20).stdout


class Screen:
    """The pane's text, read through one control-mode tmux client (no process per capture)."""

    def __init__(self, sock: str, target: str = "c"):
        self.target = target
        self.proc = subprocess.Popen(["tmux", "-L", sock, "-C", "attach", "-t", target, "-f", "ignore-size,no-output"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._block()  # the attach's own reply

    def _block(self) -> str:
        assert self.proc.stdout is not None
        out: list[str] = []
        inside = False
        for line in self.proc.stdout:
            if line.startswith("%begin"):
                inside = True
            elif line.startswith(("%end", "%error")) and inside:
                return "".join(out)
            elif inside:
                out.append(line)
        raise RuntimeError("tmux control client ended")

    def capture(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"capture-pane -p -t {self.target}\n")
        self.proc.stdin.flush()
        return self._block()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def byte_compile() -> None:
    """Byte-compile the console's packages in place (__pycache__, git-ignored), as pip does at install."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", "console", "engine", "remote"], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)


def start_run(root: Path, layers: int) -> tuple[str, dict]:
    from engine.api import open_engine
    from engine.fixtures import build_fixture

    ckpt = build_fixture(root / "ckpt", family="deepseek-v3", dtype="fp8", layers=layers, experts=8, hidden=128,
                         moe_inter=64, mtp=True)
    samples = root / "samples.json"
    samples.write_text(json.dumps([f"benchmark sample {i}: tokens for the experts" for i in range(128)]))
    from engine.runs.recipe_toml import write_recipe
    from tests.functional.real_run import calibrated_recipe

    recipe = write_recipe(root / "recipe.toml", calibrated_recipe(root, ckpt, samples, num_samples=128, seq_len=64))
    env = {"QUANTDECK_HOME": str(root / "home"), "QUANTDECK_WORKDIR": str(root / "work")}
    os.environ.update(env)
    return open_engine(str(root / "work")).start(str(recipe), preflight=False), env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--layers", type=int, default=12, help="layers of the fixture (more: a longer running stage)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--size", default="120x40")
    ap.add_argument("--launches", type=int, default=5,
                    help="launch the console this many times (the first frame's median is reported: the machine's "
                         "load varies); the last one stays up --seconds for the CPU share")
    args = ap.parse_args(argv)
    if shutil.which("tmux") is None:
        print("console_load: tmux is needed (apt-get install -y tmux)", file=sys.stderr)
        return 2
    import psutil

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="qd-console-load-"))
    byte_compile()
    run_id, env = start_run(root, args.layers)
    print(f"run {run_id} started in {root}", file=sys.stderr)
    from engine.api import open_engine

    eng = open_engine(env["QUANTDECK_WORKDIR"])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # follow a RUNNING stage, as an operator would
        v = eng.status(run_id)
        if any(s.state == "RUNNING" for s in v.stages if s.name != "inspect"):
            break
        time.sleep(0.5)
    w, h = args.size.split("x")
    env.update({"PYTHONPATH": str(REPO), "QUANTDECK_FLEET": "replay", "QUANTDECK_FLEET_INTERVAL": "1.0",
                "TERM": "xterm-256color"})
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    cmd = (f"cd {shlex.quote(str(REPO))} && exec env {exports} {shlex.quote(sys.executable)} "
           f"-m console.cli console {run_id}")
    frames: list[dict] = []
    sock = ""
    for i in range(args.launches):  # the last launch stays up for the CPU share
        if i:
            tmux(sock, "send-keys", "-t", "c", "q")
            time.sleep(0.5)
            tmux(sock, "kill-server")
        sock = f"qd-bench-{uuid.uuid4().hex[:6]}"
        load = os.getloadavg()[0]
        t_launch = time.monotonic()
        tmux(sock, "new-session", "-d", "-s", "c", "-x", w, "-y", h, cmd)
        pid = int(tmux(sock, "display", "-p", "-t", "c", "#{pane_pid}").strip())
        proc = psutil.Process(pid)
        first_frame = None
        look = Screen(sock)
        while time.monotonic() - t_launch < 30:
            screen = look.capture()
            if "node0" in screen and "stale" in screen and f"run {run_id}" in screen and "calibrate" in screen \
                    and "Quit" in screen:
                first_frame = time.monotonic() - t_launch
                break
            time.sleep(0.01)
        look.close()
        frames.append({"first_full_frame_s": None if first_frame is None else round(first_frame, 3),
                       "cpu_s": round(sum(proc.cpu_times()[:2]), 2), "load1": round(load, 2)})
        print(f"launch {i + 1}/{args.launches}: {frames[-1]}", file=sys.stderr)
    cpu0 = sum(proc.cpu_times()[:2])
    startup_cpu = cpu0
    t0 = time.monotonic()
    time.sleep(args.seconds)
    cpu1 = sum(proc.cpu_times()[:2])
    wall = time.monotonic() - t0
    rss = proc.memory_info().rss
    capture = tmux(sock, "capture-pane", "-p", "-t", "c")
    tmux(sock, "send-keys", "-t", "c", "q")
    time.sleep(1.0)
    alive_after_quit = eng.status(run_id).driver_alive
    tmux(sock, "kill-server")
    share = (cpu1 - cpu0) / wall
    seen = sorted(f["first_full_frame_s"] for f in frames if f["first_full_frame_s"] is not None)
    median = seen[len(seen) // 2] if len(seen) == len(frames) else None  # a launch that never showed it: no figure
    result = {"run": run_id, "seconds": round(wall, 1), "console_cpu_share_of_one_core": round(share, 4),
              "target_cpu_share": 0.10, "first_full_frame_s": median, "target_first_frame_s": 1.0,
              "launches": frames, "startup_cpu_s": round(startup_cpu, 2), "rss_mib": round(rss / 2**20, 1),
              "run_alive_after_console_quit": alive_after_quit, "fleet": "4 nodes x 8 GPUs replayed at 1 Hz",
              "cpus": os.cpu_count(), "loadavg": os.getloadavg()}
    (out / "console_load.json").write_text(json.dumps(result, indent=1))
    (out / "console_dashboard.txt").write_text(capture)
    print(capture)
    print(json.dumps(result, indent=1))
    if alive_after_quit:
        eng.cancel(run_id)  # the benchmark's run is not needed any longer
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
