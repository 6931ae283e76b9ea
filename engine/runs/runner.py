"""The runner: creates a run from a recipe, and drives its plan stage by stage through a Launcher.

The driver (`python -m engine.runs.runner --run-dir D --mode M`) is itself started detached, so closing the
terminal or pressing Ctrl-C in a follower never stops a run. It holds the run's driver lock (one driver
per run) and the output lock (two live runs never write one output), starts each stage's worker through
the launcher, waits on status.json and the worker's liveness, classifies a vanished worker, and keeps the
store in step after every state change (on a thread, coalesced: engine.runs.store_sync). It notices a dead worker
within a poll (0.2 s). While it waits it watches the stage's silence (engine.runs.runview): a stall is logged once
to driver.log, and a worker that ends while its stage was stalled is recorded with the root cause `stalled`.
Launchers other than the local one come from a factory named on the command line
(`--launcher-factory remote.launchers:launcher_for`), chosen by the CLI/console: the engine never imports remote/.

As a stage starts, later stages' workers are started ahead (`Launcher.prepare`; the local launcher's standby), and
validate's decoder-block child warms up beside the stage that suits it: which ones, and why, in engine.runs.ahead.

A launcher factory is `factory(recipe: engine.runs.recipe.Recipe, run_dir: pathlib.Path) -> Launcher`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from engine.core.errors import QuantdeckError, RunError, StageLockedError
from engine.core.fsutil import atomic_write_json, read_json
from engine.core.locks import driver_alive, pid_alive, this_host  # noqa: F401 (driver_alive re-exported)
from engine.core.names import StageName, StageState
from engine.core.settings import FSYNC_ENV
from engine.runs.ahead import stages_ahead, start_warm_block, warm_block_stage
from engine.runs.durability import Syncer, stage_states, unsynced_here, written_paths
from engine.runs.launcher import Launcher, WorkerSpec
from engine.runs.local_launcher import REPO_ROOT, child_env
from engine.runs.plan import Plan, build_plan, resolve_paths, stages_to_run
from engine.runs.progress_merge import StageProgress
from engine.runs.recipe import Recipe, load_recipe, loads_recipe, recipe_hash
from engine.runs.rootcause import classify, stalled_cause
from engine.runs.rundir import (
    RunDir,
    begin_attempt,
    create_run_dir,
    driver_lock,
    output_lock,
    read_status,
    reconcile_stage,
    run_lock,
    set_status,
)
from engine.runs.runview import stage_stall
from engine.runs.store_sync import StoreSync

LOCAL_FACTORY = "engine.runs.local_launcher:local_launcher_for"
CANCEL_MARKER = "cancel-requested"


def git_commit_of(path: Path) -> str | None:
    """Short commit of the git repo holding `path` (None when it is not in a repo)."""
    try:
        res = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def target_label(recipe: Recipe) -> str:
    fmt = recipe.target.format.value
    if fmt == "nvfp4":
        fmt += " W4A4" if recipe.target.calibrate else " weight-only"
    return fmt


def load_frozen_recipe(run: RunDir) -> Recipe:
    return loads_recipe(run.recipe_path.read_text(), name=f"{run.id}/recipe.toml")


def create_run(recipe_path: str | os.PathLike, *, run_id: str | None = None) -> RunDir:
    """Make the run dir for a recipe: frozen recipe.toml, plan.json, run.json, PENDING statuses.

    Raises RecipeError (bad recipe) and StageLockedError (a live run is writing the same output)."""
    path = Path(recipe_path).resolve()
    recipe = load_recipe(path)
    text = path.read_text()
    paths = resolve_paths(recipe, path.parent)
    lk = output_lock(paths["workdir"], paths["output"])
    lk.acquire().release()  # refuse early, before anything is written, if a live run owns the output
    run = create_run_dir(paths["workdir"], run_id)
    h = recipe_hash(text)
    plan = build_plan(recipe, run_id=run.id, run_dir=run.path, base=path.parent, recipe_hash=h)
    run.recipe_path.write_text(text)
    atomic_write_json(run.plan_path, plan.to_json())
    atomic_write_json(run.meta_path, {
        "id": run.id, "created": plan.created, "recipe_path": str(path), "recipe_hash": h,
        "git_commit": git_commit_of(path.parent), "model": recipe.label,
        "family": recipe.model.family.value if recipe.model.family else None,
        "target": target_label(recipe), "layouts": ",".join(x.value for x in recipe.target.layouts),
        "calib_size": recipe.calibration.num_samples if recipe.target.calibrate else None,
        "stall_after_s": recipe.run.stall_after_s, "workdir": plan.workdir, "output": plan.output,
        "source": plan.source, "note": None})
    for s in plan.stages:
        atomic_write_json(run.status_path(s.name), read_status(run, s.name))
    return run


def update_meta(run: RunDir, **fields: Any) -> None:
    with run_lock(run):
        meta = run.read_meta()
        meta.update(fields)
        atomic_write_json(run.meta_path, meta)


def load_factory(spec: str | None) -> Callable[[Recipe, Path], Launcher]:
    mod, _, fn = (spec or LOCAL_FACTORY).partition(":")
    try:
        return getattr(importlib.import_module(mod), fn or "launcher_for")
    except (ImportError, AttributeError) as e:
        raise RunError(f"cannot load launcher factory {spec!r}: {e}", at=spec or "") from e


def log_tail(path: Path, nbytes: int = 16384) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - nbytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


STALL_CHECK_S = 5.0  # how often wait_stage looks at the stage's silence


def wait_stage(run: RunDir, stage: str, attempt: int, launcher: Launcher, host: str, pid: int,
               poll_s: float = 0.2) -> dict[str, Any]:
    """Wait until the stage's status is terminal; a worker that vanished becomes FAILED_WORKER with the
    root cause of its log tail / exit code (`stalled` when its stage was stalled before it ended). Returns
    the final status."""
    progress, stall, next_check = StageProgress(run.stage_dir(stage)), None, 0.0
    while True:
        st = read_status(run, stage)
        if StageState(st["state"]).is_terminal() or int(st["attempt"]) != attempt:
            return st
        if time.monotonic() >= next_check:
            now_stall = stage_stall(run, stage, progress)
            if now_stall is not None and now_stall.stalled and not (stall and stall.stalled):
                print(f"quantdeck runner: {now_stall.line(stage)} (run {run.id})", file=sys.stderr, flush=True)
            stall, next_check = now_stall, time.monotonic() + STALL_CHECK_S
        if not launcher.is_alive(host, pid):
            time.sleep(poll_s)  # a final status written just before exit
            st = read_status(run, stage)
            if StageState(st["state"]).is_terminal():
                return st
            code = getattr(launcher, "exit_code", lambda p: None)(pid)
            cause = classify(log_tail(run.log_path(stage)) if code not in (None,) and code >= 0 else "",
                             exit_code=code)
            if stall is not None and stall.stalled:
                cause = stalled_cause(stall.line(stage), cause)
            return reconcile_stage(run, stage, lambda h, p, s: False, error_class=cause.cls, error=cause.summary,
                                   hint=cause.hint.replace("RUN", run.id), exit_code=code,
                                   signal=-code if code is not None and code < 0 else None)
        time.sleep(poll_s)


def winding_down(run: RunDir) -> str | None:
    """What a live driver of `run` is about to notice, when it is only that: a worker of this host recorded as
    STARTING/RUNNING whose process is gone (it notices within a poll, records the failure and exits), or no
    stage running at all (it is finishing). None when a stage still has a live (or remote) worker."""
    gone = None
    for name in run.stage_names():
        st = read_status(run, name)
        if st["state"] not in (StageState.STARTING.value, StageState.RUNNING.value):
            continue
        if st.get("host") not in (None, "local", this_host()) or not st.get("pid"):
            return None
        if pid_alive(st["pid"], st.get("pid_start")):
            return None
        gone = gone or f"worker pid {st['pid']} of stage {name} on {st.get('host') or this_host()} is gone"
    return gone or "no stage is running"


def wait_driver_released(run: RunDir, *, timeout_s: float = 10.0,
                         on_wait: Callable[[str], None] | None = None) -> None:
    """Return once no live driver holds `run` (resume, export-only start a new one then).

    A driver that is only winding down (`winding_down`: its worker was just killed) is waited for, up to
    `timeout_s`; `on_wait(line)` is told once what is waited for, naming the driver's pid and the stage.
    Raises StageLockedError at once while the run is live, or when the wait runs out."""
    lock, deadline, told = driver_lock(run), time.monotonic() + timeout_s, None
    while True:
        try:
            lock.acquire().release()
            return
        except StageLockedError as e:
            why = winding_down(run)
            if why is None or time.monotonic() >= deadline:
                if told:
                    raise StageLockedError(f"{e.msg}; waited {timeout_s:.0f}s for it to notice that {told}",
                                           at=e.at, hint=e.hint) from None
                raise
            if told is None:
                h = lock.holder() or {}
                told = why
                if on_wait is not None:
                    on_wait(f"waiting for the driver of run {run.id} (pid {h.get('pid', '?')} on "
                            f"{h.get('host', '?')}) to notice that {why} (up to {timeout_s:.0f}s)")
        time.sleep(0.1)


def cancel_requested(run: RunDir) -> bool:
    return (run.path / CANCEL_MARKER).exists()


def drive(run: RunDir, mode: str = "run", launcher: Launcher | None = None, *,
          poll_s: float | None = None) -> StageState:
    """Run the plan's stages for `mode` in order; returns the run's result (SUCCEEDED, FAILED, CANCELLED).
    `poll_s`: how often a stage's status is read (default 0.05 s for local workers, whose status is a local
    file and whose liveness a local check; 0.2 s where asking costs a round trip, as over SSH).

    Raises StageLockedError when another driver owns the run or another live run owns its output."""
    plan = Plan.from_json(run.read_plan())
    recipe = load_frozen_recipe(run)
    launcher = launcher or load_factory(None)(recipe, run.path)
    if poll_s is None:
        poll_s = 0.05 if launcher.name == "local" else 0.2
    with driver_lock(run), output_lock(plan.workdir, plan.output):
        prev = read_json(run.driver_path) or {}
        atomic_write_json(run.driver_path, {"pid": os.getpid(), "pgid": os.getpgid(0), "host": this_host(),
                                            "mode": mode, "started_at": time.time(), "launcher": launcher.name,
                                            "launcher_factory": prev.get("launcher_factory")})
        (run.path / CANCEL_MARKER).unlink(missing_ok=True)
        def alive(host: str | None, pid: int | None, start: str | None) -> bool:
            if host in (None, "local", this_host()):
                return pid_alive(pid, start)
            try:
                return launcher.is_alive(host, pid)
            except QuantdeckError:
                return True  # unreachable is not dead: begin_attempt will refuse while it looks live

        for name in plan.names():  # leftovers of a dead driver: never a stage "running" with nobody behind it
            reconcile_stage(run, name, alive)
        states, again = stage_states(run, plan)
        if again:
            print(f"quantdeck runner: this machine rebooted before what {again[0]} wrote was synced to the disk: "
                  f"{', '.join(again)} run again (their shards are checked by digest)", file=sys.stderr, flush=True)
        todo = stages_to_run(plan, states, mode)
        syncer = Syncer(run, written_paths(run, plan)) if launcher.name == "local" else None
        for name, attempt in unsynced_here(run, plan) if syncer is not None else ():
            syncer.after(name, attempt)
        result = StageState.SUCCEEDED
        warm, warm_at = None, warm_block_stage(plan, todo, launcher)
        store = StoreSync(run)
        try:
            for i, name in enumerate(todo):
                if cancel_requested(run):
                    result = StageState.CANCELLED
                    break
                cur = read_status(run, name)
                if cur["state"] in (StageState.STARTING.value, StageState.RUNNING.value) and cur.get("pid"):
                    # a live worker left by an earlier driver (killed, or its machine rebooted): re-attach to it
                    st = wait_stage(run, name, int(cur["attempt"]), launcher, cur.get("host") or "local",
                                    int(cur["pid"]), poll_s)
                    store.request()
                    if not StageState(st["state"]).is_done():
                        result = StageState.CANCELLED if st["state"] == StageState.CANCELLED else StageState.FAILED
                        break
                    _synced_behind(syncer, name, st)
                    continue
                attempt = begin_attempt(run, name, launcher=launcher.name)
                try:
                    handle = launcher.start(_worker_spec(run, plan, recipe, name, mode, launcher))
                except QuantdeckError as e:
                    set_status(run, name, StageState.FAILED, attempt=attempt, error_class="launch",
                               error=e.one_line(), hint=e.hint)
                    store.request()
                    result = StageState.FAILED
                    break
                set_status(run, name, StageState.STARTING, attempt=attempt, host=handle.host, pid=handle.pid)
                store.request()
                if syncer is not None:
                    syncer.beside(name)
                for ahead in stages_ahead(todo, i):  # before the warm child, whose start takes the driver ~0.1 s
                    launcher.prepare(_worker_spec(run, plan, recipe, ahead, mode, launcher))
                if name == warm_at:  # beside this stage's worker, which has just started
                    warm = start_warm_block(run, plan)
                st = wait_stage(run, name, attempt, launcher, handle.host, handle.pid, poll_s)
                store.request()
                if name == StageName.VALIDATE.value and warm is not None:
                    warm.stop()  # answered (or never asked): not kept through eval
                    warm = None
                state = StageState(st["state"])
                if not state.is_done():
                    result = StageState.CANCELLED if state == StageState.CANCELLED else StageState.FAILED
                    break
                _synced_behind(syncer, name, st)
        finally:
            if warm is not None:
                warm.stop()
            if syncer is not None:  # the run ends with its stages' writes on the disk
                update_meta(run, sync_wait_s=round(syncer.close(), 3))
            store.close()  # the last update, made here: the store ends in step with the run dir
        launcher.close()
        return result


def _synced_behind(syncer: Syncer | None, name: str, st: dict[str, Any]) -> None:
    if syncer is not None and st.get("synced") is False:
        syncer.after(name, int(st["attempt"]))


def _worker_spec(run: RunDir, plan: Plan, recipe: Recipe, name: str, mode: str, launcher: Launcher) -> WorkerSpec:
    sp = plan.stage(name)
    # on this machine the driver syncs behind a later stage (engine.runs.durability), unless the operator set it
    env = {FSYNC_ENV: "0"} if launcher.name == "local" and FSYNC_ENV not in os.environ else {}
    return WorkerSpec(run_dir=str(run.path), stage=name, log_path=str(run.log_path(name)), env=env,
                      args=("--mode", mode) if mode != "run" else (),
                      nnodes=max(1, len(sp.nodes)) if sp.distributed else 1,
                      nproc_per_node=_local_ranks(recipe) if sp.distributed else 1)


def _local_ranks(recipe: Recipe) -> int:
    """Ranks of a distributed stage on this machine alone: [cluster] gpus_per_node without nodes (default 1)."""
    if recipe.cluster.is_local and recipe.cluster.gpus_per_node:
        return int(recipe.cluster.gpus_per_node)
    return 1


def spawn_driver(run: RunDir, mode: str = "run", launcher_factory: str | None = None,
                 env: dict[str, str] | None = None) -> int:
    """Start the driver detached (own session, stdin /dev/null, output to <run>/driver.log); its pid."""
    cmd = [sys.executable, "-m", "engine.runs.runner", "--run-dir", str(run.path), "--mode", mode]
    if launcher_factory:
        cmd += ["--launcher-factory", launcher_factory]
    with open(run.path / "driver.log", "ab") as out, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, stdin=devnull, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, env=child_env(env), cwd=str(REPO_ROOT))
    atomic_write_json(run.driver_path, {"pid": proc.pid, "pgid": proc.pid, "host": this_host(), "mode": mode,
                                        "started_at": time.time(), "launcher": launcher_factory or "local",
                                        "launcher_factory": launcher_factory})
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.runs.runner", description="Drive a quantdeck run's plan.")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--mode", default="run")
    ap.add_argument("--launcher-factory", default=None)
    args = ap.parse_args(argv)
    run = RunDir(Path(args.run_dir).resolve())
    try:
        launcher = load_factory(args.launcher_factory)(load_frozen_recipe(run), run.path)
        result = drive(run, args.mode, launcher)
    except QuantdeckError as e:
        print(f"quantdeck runner: error: {e.one_line()}", file=sys.stderr, flush=True)
        return int(e.exit_code)
    print(json.dumps({"run": run.id, "result": result}), flush=True)
    return 0 if result == StageState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
