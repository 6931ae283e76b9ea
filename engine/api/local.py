"""The facade's local implementation (engine.api re-exports it): `LocalEngine`, the `Engine` (engine.api.engine) whose
runs, named by id, unique id prefix or run dir path, are started, followed, resumed, cancelled and checked from this
machine, and the module functions beside it (open_engine, the recipe helpers). Its methods raise what `Engine` lists
per method."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.api.engine import Engine
from engine.core.errors import PreflightError, RunError, ValidationFailedError
from engine.core.names import StageState
from engine.core.settings import settings

if TYPE_CHECKING:
    from engine.core.events import Event
    from engine.runs.rundir import RunDir
    from engine.runs.runview import RunView


class LocalEngine(Engine):
    """Runs drive from this machine (workers local, or remote through a launcher factory)."""

    def __init__(self, workdir: str | None = None):
        self.workdir = workdir or settings().workdir  # QUANTDECK_WORKDIR, else ./quantdeck-work
        from engine.runs.figures import FigureReader
        from engine.runs.runview import ProgressCache

        self._progress = ProgressCache()  # a stage's rank files read by offset across status() calls
        self._figures = FigureReader()  # the calibrate metrics, amax coverage and validate reports, likewise

    # --- lookup ----------------------------------------------------------------------------------------

    def find(self, run: str) -> RunDir:
        """The run's directory (its `path`, `recipe_path`). Raises RunError (unknown or ambiguous run)."""
        from engine.runs.rundir import RunDir, find_run

        p = Path(run)
        if (p / "plan.json").exists():
            return RunDir(p.resolve())
        from engine.runs.store import Store

        with Store() as store:
            recs = store.runs()
        hits = [r for r in recs if r.id == run] or [r for r in recs if r.id.startswith(run)]
        hits = [r for r in hits if r.run_dir and (Path(r.run_dir) / "plan.json").exists()]
        if len(hits) == 1:
            return RunDir(Path(hits[0].run_dir))
        if len(hits) > 1:
            raise RunError(f"run id {run!r} is ambiguous ({len(hits)} runs match)", at=run,
                           hint="give more of the id: " + ", ".join(r.id for r in hits[:5]))
        return find_run(self.workdir, run)

    # --- starting --------------------------------------------------------------------------------------

    def start(self, recipe_path, *, preflight=None, launcher_factory=None, env=None, extra_checks=()):
        from engine.runs.recipe import load_recipe
        from engine.runs.runner import create_run, spawn_driver
        from engine.runs.store_sync import sync_store

        recipe = load_recipe(recipe_path)
        if preflight if preflight is not None else recipe.run.preflight:
            fails = self.preflight(recipe_path, extra_checks=extra_checks)
            if fails:
                raise PreflightError(f"preflight failed ({len(fails)} problem{'s' if len(fails) > 1 else ''}): "
                                     + "; ".join(fails), at=str(recipe_path), failures=fails,
                                     hint="fix those, or `quantdeck preflight RECIPE` to re-check")
        run = create_run(recipe_path)
        spawn_driver(run, "run", launcher_factory, env)
        sync_store(run)  # while the driver starts
        return run.id

    def _restart(self, run: str, mode: str, launcher_factory: str | None,
                 on_wait: Callable[[str], None] | None = None) -> str:
        from engine.runs.durability import stage_states
        from engine.runs.plan import Plan, stages_to_run
        from engine.runs.runner import spawn_driver, wait_driver_released

        rd = self.find(run)
        wait_driver_released(rd, on_wait=on_wait)  # StageLockedError if a driver is live
        plan = Plan.from_json(rd.read_plan())
        if not stages_to_run(plan, stage_states(rd, plan)[0], mode):
            raise RunError(f"run {rd.id} has nothing left to do (every stage is done)", at=rd.id,
                           hint=f"`quantdeck validate-only {rd.id}` checks what it saved")
        spawn_driver(rd, mode, launcher_factory)
        return rd.id

    def resume(self, run, *, launcher_factory=None, on_wait=None):
        return self._restart(run, "resume", launcher_factory, on_wait)

    def export_only(self, run, *, launcher_factory=None, on_wait=None):
        return self._restart(run, "export-only", launcher_factory, on_wait)

    # --- checking and stopping -------------------------------------------------------------------------

    def validate_only(self, run):
        from engine.core.locks import this_host
        from engine.runs.plan import Plan
        from engine.runs.rundir import read_status
        from engine.runs.worker import load_stage_class
        from engine.stages.base import StageContext

        rd = self.find(run)
        plan = Plan.from_json(rd.read_plan())
        problems: list[str] = []
        for sp in plan.stages:
            st = read_status(rd, sp.name)
            try:
                cls = load_stage_class(sp.name)
            except Exception as e:  # noqa: BLE001 - a stage whose module is missing is a problem to report
                problems.append(f"{sp.name}: cannot load the stage: {e}")
                continue
            ctx = StageContext(run_dir=rd.path, stage_dir=rd.stage_dir(sp.name), params=sp.params,
                               host=this_host(), mode="validate-only")
            if st["state"] == StageState.PENDING.value and not _has_outputs(sp.params):
                continue
            for p in cls().check_saved(ctx):
                problems.append(f"{sp.name}: {p}")
        return problems

    def cancel(self, run, *, launcher_factory=None):
        from engine.core.fsutil import read_json
        from engine.core.locks import pid_alive, this_host
        from engine.runs.rundir import read_status, set_status
        from engine.runs.runner import CANCEL_MARKER
        from engine.runs.store_sync import sync_store

        rd = self.find(run)
        drv = read_json(rd.driver_path) or {}
        (rd.path / CANCEL_MARKER).write_text(f"{time.time()}\n")
        cancelled = []
        victims: list[tuple[str, int]] = []
        for name in rd.stage_names():
            st = read_status(rd, name)
            if StageState(st["state"]).is_terminal() or st["state"] == StageState.PENDING.value:
                continue
            set_status(rd, name, StageState.CANCELLED, attempt=st["attempt"], error_class="interrupted",
                       error="cancelled by operator", hint=f"`quantdeck resume {rd.id}` continues")
            cancelled.append(name)
            if st.get("pid") and st.get("host") not in (None, "local", this_host()):
                _terminate_remote(rd, st["host"], int(st["pid"]), launcher_factory or drv.get("launcher_factory"))
            elif st.get("pid"):
                victims.append((st.get("host") or "local", int(st.get("pgid") or st["pid"])))
        if drv.get("pid") and drv.get("host") in (None, this_host()) and pid_alive(drv["pid"]):
            victims.append(("local", int(drv.get("pgid") or drv["pid"])))
        for _, pgid in victims:
            _killpg(pgid, signal.SIGTERM)
        deadline = time.time() + 5
        while time.time() < deadline and any(pid_alive(p) for _, p in victims):
            time.sleep(0.1)
        for _, pgid in victims:
            if pid_alive(pgid):
                _killpg(pgid, signal.SIGKILL)
        sync_store(rd)
        return cancelled

    # --- reading ---------------------------------------------------------------------------------------

    def status(self, run, *, figures=False):
        from engine.runs.runview import run_view

        return run_view(self.find(run), self._progress, self._figures if figures else None)

    def runs(self):
        from engine.runs.rundir import RunDir, list_run_dirs
        from engine.runs.runview import run_view
        from engine.runs.store import Store

        seen: dict[str, RunDir] = {}
        with Store() as store:
            for r in store.runs():
                if r.run_dir and (Path(r.run_dir) / "plan.json").exists():
                    seen[r.id] = RunDir(Path(r.run_dir))
        for rd in list_run_dirs(self.workdir):
            seen.setdefault(rd.id, rd)
        return [run_view(rd, self._progress) for _, rd in sorted(seen.items())]

    def quality(self, run):
        from engine.runs.store import eval_figures

        rd = self.find(run)
        kld, top1 = eval_figures(rd, rd.read_plan())
        return {"kld_mean": kld, "top1_agree": top1}

    def plan(self, run):
        return self.find(run).read_plan()

    def events(self, run, stage, offset=0, rank=0):
        from engine.core.events import read_events

        rd = self.find(run)
        return read_events(rd.events_path(stage, rank), offset)

    def log(self, run, stage, offset=0):
        rd = self.find(run)
        try:
            with open(rd.log_path(stage), "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            return "", offset
        return data.decode("utf-8", errors="replace"), offset + len(data)

    def driver_log(self, run: str, max_bytes: int = 4096) -> str:
        """The tail of the run's driver.log (why a driver refused to start, for instance). Raises RunError."""
        from engine.runs.runner import log_tail

        return log_tail(self.find(run).path / "driver.log", max_bytes)

    def history(self):
        from engine.runs.rundir import RunDir
        from engine.runs.runview import reconcile_local
        from engine.runs.store import Store, sync_run

        live = (StageState.RUNNING, StageState.PENDING)
        with Store() as store:
            for r in store.runs():  # refresh rows of runs that were live at their last sync
                if r.result in live and r.run_dir and (Path(r.run_dir) / "plan.json").exists():
                    reconcile_local(RunDir(Path(r.run_dir)))
                    sync_run(store, r.run_dir)
            return store.runs()

    def attempts(self, run):
        from engine.runs.store import Store, sync_run

        rd = self.find(run)
        with Store() as store:
            sync_run(store, rd.path)
            return store.attempts(rd.id)

    def note(self, run, text):
        from engine.runs.runner import update_meta
        from engine.runs.store import Store, sync_run

        rd = self.find(run)
        update_meta(rd, note=text)
        with Store() as store:
            sync_run(store, rd.path)
            store.set_note(rd.id, text)

    def rescan(self, root):
        from engine.runs.store import Store, rescan

        with Store() as store:
            return rescan(store, root)

    def preflight(self, recipe_path, notes=None, extra_checks=(), report=None):
        """Also fills `notes` (GPU memory, versions) when given a list, and `report["memory"]` (each heavy
        stage's host and GPU memory per rank and node) when given a dict; `extra_checks` are callables
        `check(facts) -> list[str]` (remote per-node checks)."""
        from engine.runs.preflight import run_preflight

        return run_preflight(recipe_path, extra_checks=extra_checks, notes=notes, report=report)

    def load_recipe(self, recipe_path: str):
        """The validated recipe (the module's load_recipe). Raises RecipeError naming file and key."""
        return load_recipe(recipe_path)

    def follow(self, run: str, on_event: Callable[[Event], None], *, poll_s: float = 0.3,
               stop: Callable[[], bool] | None = None) -> RunView:
        """Hand every new event of every stage (all ranks) to `on_event` until the run's driver is gone
        and nothing runs; returns the final view. Stopping the follower never stops the run."""
        from engine.core.events import read_events
        from engine.core.fsutil import read_json
        from engine.core.locks import exit_waker, this_host
        from engine.runs.runview import run_view

        rd = self.find(run)
        offsets: dict[Path, int] = {}

        def drain() -> None:
            for name in rd.stage_names():
                for path in rd.events_paths(name):
                    evs, offsets[path] = read_events(path, offsets.get(path, 0))
                    for ev in evs:
                        on_event(ev)

        drv = read_json(rd.driver_path) or {}
        with exit_waker(drv.get("pid") if drv.get("host") in (None, this_host()) else None) as sleep:
            while True:
                drain()
                view = run_view(rd, self._progress)
                if stop is not None and stop():
                    return view
                if not view.driver_alive and view.result != StageState.RUNNING:
                    drain()  # the last lines
                    return view
                sleep(poll_s)  # ends when the driver does


def open_engine(workdir: str | None = None) -> LocalEngine:
    """The engine over the runs of this machine (`workdir`: where runs are looked up besides the store)."""
    return LocalEngine(workdir)


def init_recipe(family: str | None = None, **kw: Any) -> str:
    """The commented recipe `quantdeck init` prints. Raises ValueError for an unknown family."""
    from engine.runs.recipe_toml import init_recipe_text

    return init_recipe_text(family, **kw)


def raise_if_problems(problems: list[str], what: str) -> None:
    """ValidationFailedError listing `problems` (what validate_only found), unless there are none."""
    if problems:
        raise ValidationFailedError(f"{what}: {len(problems)} problem(s): " + "; ".join(problems), at=what,
                                    hint="resume the run to redo what is broken")


def load_recipe(recipe_path: str | os.PathLike):
    """The validated recipe (engine.runs.recipe.Recipe). Raises RecipeError naming file and key."""
    from engine.runs.recipe import load_recipe as load

    return load(recipe_path)


def write_recipe(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Validate `data` (a recipe's sections) and write it as TOML; its path. Raises RecipeError naming the key."""
    from engine.runs.recipe_toml import write_recipe as write

    return write(path, data)


def _has_outputs(params: dict[str, Any]) -> bool:
    outs = params.get("outputs", {})
    return any(isinstance(v, str) and (Path(v).exists() or Path(v + ".partial").exists()) for v in outs.values())


def _terminate_remote(rd: RunDir, host: str, pid: int, factory: str | None) -> None:
    """Stop a worker on another node through the run's launcher (SIGTERM, then SIGKILL after 5 s)."""
    from engine.runs.runner import load_factory, load_frozen_recipe

    if not factory:
        raise RunError(f"the worker of run {rd.id} runs on {host}, and the run has no remote launcher recorded",
                       at=host, hint=f"stop pid {pid} on {host} by hand (kill -- -PGID), then resume")
    launcher = load_factory(factory)(load_frozen_recipe(rd), rd.path)
    try:
        launcher.terminate(host, pid, signal.SIGTERM)
        deadline = time.time() + 5
        while time.time() < deadline and launcher.is_alive(host, pid):
            time.sleep(0.2)
        if launcher.is_alive(host, pid):
            launcher.terminate(host, pid, signal.SIGKILL)
    finally:
        launcher.close()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
