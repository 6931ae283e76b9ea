"""`quantdeck console [RECIPE|RUN]` (the Textual console) and `quantdeck demo [--headless] [--workspace DIR]`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from engine.core.names import StageState


def _is_recipe(target: str | None) -> bool:
    return bool(target) and Path(target).is_file() and Path(target).suffix == ".toml"


def _cluster_of(eng, target: str | None):
    """The recipe's [cluster] when it names remote nodes (for live telemetry), else None."""
    try:
        path = target if _is_recipe(target) else (str(eng.find(target).recipe_path) if target else None)
        if path:
            recipe = eng.load_recipe(path)
            return None if recipe.cluster.is_local else recipe.cluster
    except Exception:  # noqa: BLE001 - no telemetry is better than no console
        return None
    return None


@click.command("console")
@click.argument("target", required=False, metavar="[RECIPE|RUN]")
@click.option("--replay-fleet", is_flag=True, help="Show a replayed 4×8-GPU fleet (real recorded nvidia-smi output).")
def console_cmd(target: str | None, replay_fleet: bool) -> None:
    """The operations console: fleet, the run's stages, calibration, logs, history.

    With a RECIPE (a .toml file) it starts a new run and follows it; with a RUN id it attaches to that run;
    with neither, to the live (else the latest) run. Quitting never stops a run; opening it again re-attaches.
    """
    import gc

    gc.disable()  # start-up makes ~10^6 objects and no garbage: collecting them only delays the first frame;
    # the app collects again once it has drawn the run (QuantdeckApp.on_mount)
    from console.api_backend import ApiBackend
    from console.factory import build_app, default_fleet
    from console.fleet import LazyFleet

    backend = ApiBackend()
    run = target
    if _is_recipe(target):
        run = backend.start(str(target))
        click.echo(f"run {run}", err=True)
    if replay_fleet:
        os.environ["QUANTDECK_FLEET"] = "replay"
    workdir = getattr(backend.eng, "workdir", ".")  # the fleet is set up in the telemetry worker, not here
    fleet = LazyFleet(lambda: default_fleet(workdir=workdir, cluster=lambda: _cluster_of(backend.eng, target)))
    app = build_app(run, backend=backend, fleet=fleet, recipe_hint=str(target) if _is_recipe(target) else "")
    app.run()
    if app.run_id and app.run_view is not None and app.run_view.live:
        click.echo(f"left the console; run {app.run_id} goes on without it "
                   f"(`quantdeck console {app.run_id}` re-attaches)", err=True)
    elif app.run_id:
        click.echo(f"left the console (run {app.run_id}: {app.run_view.result.lower() if app.run_view else '?'}; "
                   f"`quantdeck console {app.run_id}` re-opens it)", err=True)


# ------------------------------------------------------------------------------------------------ demo

SAMPLES = [
    "The quick brown fox jumps over the lazy dog while the experts route every token.",
    "Quantization to NVFP4 keeps one FP8 scale per sixteen weights and one global scale per tensor.",
    "Calibration runs real text through each decoder layer and records the largest activation.",
    "def add(a, b):\n    return a + b",
    "A mixture of experts sends each token to a few of many feed-forward networks.",
    "Operators resume long runs from the first unit that is not done.",
    "Weights stream one layer at a time, so memory stays small whatever the model size.",
    "Eight GPUs per node, four nodes, one console to watch them all.",
]


def prepare_demo(workspace: Path, log=lambda s: None) -> tuple[Path, bool]:
    """Fixture + samples + recipe in `workspace`; returns (recipe path, calibrated)."""
    from engine.api import build_fixture, calibration_available, write_recipe

    workspace.mkdir(parents=True, exist_ok=True)
    ckpt = workspace / "DeepSeek-V3-tiny-fp8"
    if not (ckpt / "config.json").exists():
        log(f"building a tiny DeepSeek-V3 FP8 checkpoint (2 layers, 4 experts, MTP) in {ckpt}")
        build_fixture(ckpt, family="deepseek-v3", dtype="fp8", layers=2, experts=4, hidden=128, moe_inter=64,
                      mtp=True, overwrite=True)
    samples = workspace / "samples.json"
    # 16 to calibrate on, then 8 held out for the eval stage (never the texts calibrated on)
    held_out = [f"Held out, check {i + 1}: {s}" for i, s in enumerate(reversed(SAMPLES))]
    samples.write_text(json.dumps(SAMPLES * 2 + held_out, indent=1))
    calibrated, why = calibration_available()
    if not calibrated:
        log(f"the calibrated pipeline is not available here ({why}): running weight-only NVFP4 instead")
    out = workspace / "out" / ("DeepSeek-V3-tiny-NVFP4" if calibrated else "DeepSeek-V3-tiny-NVFP4-weight-only")
    recipe = write_recipe(workspace / "recipe.toml", {
        "run": {"workdir": str(workspace / "work")},
        "source": {"path": str(ckpt)},
        "target": {"format": "nvfp4", "calibrate": calibrated, "layouts": ["modelopt", "compressed-tensors"],
                   "output": str(out)},
        "calibration": {"samples": str(samples), "num_samples": 16, "seq_len": 32},
        # a random tiny model agrees with itself less than a trained one: the gate is loose here
        "eval": {"num_samples": 8, "seq_len": 32, "max_kld_mean": 0.5, "min_top1": 0.3}})
    if out.exists():  # a fresh output each time the demo runs
        import shutil

        shutil.rmtree(out)
    return recipe, calibrated


class LinePrinter:
    """The headless console: stage states, progress (≤ 1 line/s per stage), calibration layers, errors."""

    def __init__(self, out=sys.stderr):
        from engine.api import StageRanks

        self.out, self.last = out, {}
        self.ranks = StageRanks()  # a distributed stage's progress over all its ranks

    def __call__(self, ev) -> None:
        merged = self.ranks.feed(ev)
        d = merged or ev.data
        tag = f"[{ev.stage}]" + (f"[r{ev.rank}]" if ev.rank and not merged else "")
        line = None
        if ev.kind == "state":
            line = f"{tag} {str(d.get('state', '')).lower()}"
            if d.get("error_class"):
                line += f": {d['error_class']}: {d.get('error')}" + (f" (hint: {d['hint']})" if d.get("hint") else "")
        elif ev.kind == "metric" and d.get("name") == "calibrate.layer":
            t = d.get("tags") or {}
            line = (f"{tag} layer {int(t.get('layer', 0)) + 1}/{t.get('layers')}: {t.get('samples')} samples, "
                    f"{t.get('tokens')} tokens, {float(t.get('tokens_per_s') or 0):.0f} tok/s")
        elif ev.kind == "progress":
            now = time.monotonic()
            key = str(ev.stage)
            if d.get("done") == d.get("total") or now - self.last.get(key, 0) >= 1.0:
                self.last[key] = now
                eta = d.get("eta_s")
                line = (f"{tag} {d.get('done')}/{d.get('total')} {d.get('unit', '')}"
                        + (f" ({d['world']} ranks)" if d.get("world") else "")
                        + (f"  ETA {eta:.0f}s" if eta else "") + (f"  {d['label']}" if d.get("label") else ""))
        elif ev.kind == "log" and d.get("level") in ("warning", "error"):
            line = f"{tag} {d.get('level')}: {d.get('msg')}"
        if line:
            print(line, file=self.out, flush=True)


@click.command("demo")
@click.option("--headless", is_flag=True, help="Print progress as lines instead of opening the console.")
@click.option("--workspace", default="./demo-workspace", show_default=True, type=click.Path(file_okay=False),
              help="Where the tiny checkpoint, samples, recipe, run dirs and outputs go.")
def demo_cmd(headless: bool, workspace: str) -> None:
    """Build a tiny DeepSeek checkpoint and samples, and run the calibrated NVFP4 pipeline on it here."""
    from engine.api import open_engine

    ws = Path(workspace).resolve()
    t0 = time.monotonic()
    recipe, calibrated = prepare_demo(ws, log=lambda s: click.echo(f"demo: {s}", err=True))
    eng = open_engine(str(ws / "work"))
    run_id = eng.start(str(recipe))
    click.echo(f"run {run_id}")
    click.echo(f"demo: {'calibrated W4A4' if calibrated else 'weight-only'} NVFP4 pipeline started "
               f"(recipe {recipe}); the run goes on if you leave", err=True)
    if headless:
        try:
            view = eng.follow(run_id, LinePrinter())
        except KeyboardInterrupt:
            click.echo(f"demo: stopped following; run {run_id} goes on (quantdeck console {run_id})", err=True)
            return
        click.echo(f"demo: run {run_id} {view.result.lower()} in {time.monotonic() - t0:.0f}s", err=True)
        for s in view.stages:
            if s.error_class:
                click.echo(f"demo:   {s.name}: {s.error_class}: {s.error} (hint: {s.hint})", err=True)
        if view.result == StageState.SUCCEEDED:
            click.echo(f"demo: outputs in {ws / 'out'}; history: quantdeck history", err=True)
        else:
            raise click.exceptions.Exit(1)
        return
    from console.api_backend import ApiBackend
    from console.factory import build_app

    app = build_app(run_id, backend=ApiBackend(eng), workdir=str(ws), recipe_hint=str(recipe))
    app.run()
    state = app.run_view.result.lower() if app.run_view is not None else "?"
    if app.run_view is not None and app.run_view.live:
        click.echo(f"demo: left the console; run {run_id} goes on (quantdeck console {run_id})", err=True)
    else:
        click.echo(f"demo: run {run_id} {state}; outputs in {ws / 'out'} (quantdeck history, "
                   f"quantdeck console {run_id})", err=True)


COMMANDS = (console_cmd, demo_cmd)
