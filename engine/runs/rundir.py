"""The run directory: its layout, stage status read/write under one lock, and its live-worker locks
(engine.core.locks: FileLock, pid liveness).

    <workdir>/runs/<run-id>/
        recipe.toml                 frozen copy of the recipe as given
        plan.json                   ordered stages with resolved inputs/outputs/options (engine.runs.plan)
        run.json                    id, created, recipe path/hash, git commit, model, target, note
        driver.json                 pid/host of the process driving the plan (engine.runs.runner)
        .lock                       flock: every status write holds it (set_status)
        stages/<stage>/status.json  state, attempt, host, pid, times, error, result, attempts[]
        stages/<stage>/events.jsonl (rank 0) and events.rank<N>.jsonl (engine.core.events schema)
        stages/<stage>/log.txt      stdout+stderr of the detached worker(s)
        stages/<stage>/worker.lock  flock held by the live worker for its whole life

status.json (times are epoch seconds, UTC):
    {"stage", "state" (StageState), "attempt" (1-based, 0 = never started), "host", "pid", "pgid",
     "pid_start", "launcher", "world_size" (the stage's ranks), "started_at", "ended_at", "updated_at",
     "exit_code", "signal", "error_class", "error", "hint", "result" (stage summary),
     "attempts": [finished attempts, oldest first]}

Rules (skypilot job_lib): all writes go through `set_status` under the run's lock; a terminal state stamps
`ended_at`; RUNNING stamps `started_at` (`set_running`); within one attempt a state never moves backwards
and a terminal state is final; a new attempt is the only way to leave a terminal state (`begin_attempt`).
A non-terminal stage whose worker pid is gone becomes FAILED_WORKER (`reconcile_stage`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from engine.core.errors import RunError, StageLockedError
from engine.core.fsutil import atomic_write_json, read_json
from engine.core.locks import FileLock, pid_alive, pid_start_time
from engine.core.names import StageState

RUNS_DIR = "runs"
_ORDER = {s: i for i, s in enumerate(StageState)}
_ID_RE = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{4}$")
DEFAULT_STALL_AFTER_S = 900.0  # `[run] stall_after_s`: a RUNNING stage silent this long is shown as stalled
COLLECTIVE_TIMEOUT_ENV = "QUANTDECK_COLLECTIVE_TIMEOUT_S"  # the process-group timeout of a stage's ranks
ATTEMPT_FIELDS = ("attempt", "state", "host", "pid", "started_at", "ended_at", "exit_code", "signal",
                  "error_class", "error", "hint")


def new_run_id(now: float | None = None) -> str:
    """`YYYYMMDD-HHMMSS-xxxx` (UTC): sorts by creation time; the suffix keeps ids unique."""
    t = time.gmtime(time.time() if now is None else now)
    return time.strftime("%Y%m%d-%H%M%S", t) + "-" + secrets.token_hex(2)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def recipe_path(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def plan_path(self) -> Path:
        return self.path / "plan.json"

    @property
    def meta_path(self) -> Path:
        return self.path / "run.json"

    @property
    def driver_path(self) -> Path:
        return self.path / "driver.json"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def stage_dir(self, stage: str) -> Path:
        return self.path / "stages" / str(stage)

    def status_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "status.json"

    def events_path(self, stage: str, rank: int = 0) -> Path:
        name = "events.jsonl" if rank == 0 else f"events.rank{rank}.jsonl"
        return self.stage_dir(stage) / name

    def events_paths(self, stage: str) -> list[Path]:
        d = self.stage_dir(stage)
        extra = sorted(d.glob("events.rank*.jsonl"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        return [self.events_path(stage)] + extra

    def log_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "log.txt"

    def worker_lock_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / "worker.lock"

    def exists(self) -> bool:
        return self.plan_path.exists()

    # --- readers ---------------------------------------------------------------------------------------

    def read_meta(self) -> dict[str, Any]:
        return read_json(self.meta_path, {}) or {}

    def read_plan(self) -> dict[str, Any]:
        plan = read_json(self.plan_path)
        if plan is None:
            raise RunError(f"{self.path} is not a run directory (no plan.json)", at=str(self.path),
                           hint="pass a run id from `quantdeck status`")
        return plan

    def stall_after_s(self) -> float:
        """`[run] stall_after_s` of the run: from run.json, else from the frozen recipe.toml, else the default."""
        v = self.read_meta().get("stall_after_s")
        if not isinstance(v, (int, float)):
            try:
                v = tomllib.loads(self.recipe_path.read_text()).get("run", {}).get("stall_after_s")
            except (OSError, tomllib.TOMLDecodeError):
                v = None
        return float(v) if isinstance(v, (int, float)) and v > 0 else DEFAULT_STALL_AFTER_S

    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.read_plan().get("stages", [])]

    def read_status(self, stage: str) -> dict[str, Any]:
        return read_status(self, stage)


def runs_root(workdir: str | os.PathLike) -> Path:
    return Path(workdir) / RUNS_DIR


def create_run_dir(workdir: str | os.PathLike, run_id: str | None = None) -> RunDir:
    run_id = run_id or new_run_id()
    path = runs_root(workdir) / run_id
    path.mkdir(parents=True, exist_ok=False)
    (path / "stages").mkdir()
    return RunDir(path)


def list_run_dirs(root: str | os.PathLike) -> list[RunDir]:
    """Run dirs under `root`: a work dir (its runs/), a runs/ dir, or one run dir itself; oldest first."""
    root = Path(root)
    if (root / "plan.json").exists():
        return [RunDir(root)]
    base = root / RUNS_DIR if (root / RUNS_DIR).is_dir() else root
    if not base.is_dir():
        return []
    return [RunDir(p) for p in sorted(base.iterdir()) if (p / "plan.json").exists()]


def find_run(root: str | os.PathLike, run: str) -> RunDir:
    """A run by id, unique id prefix, or path. Raises RunError naming the known ids."""
    p = Path(run)
    if (p / "plan.json").exists():
        return RunDir(p.resolve())
    runs = list_run_dirs(root)
    exact = [r for r in runs if r.id == run]
    hits = exact or [r for r in runs if r.id.startswith(run)]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(r.id for r in runs[-5:]) or "(none)"
    if not hits:
        raise RunError(f"no run {run!r} under {root}", at=run, hint=f"recent runs: {known}")
    raise RunError(f"run id {run!r} is ambiguous ({len(hits)} runs match)", at=run,
                   hint="give more of the id: " + ", ".join(r.id for r in hits[:5]))


# --- status ----------------------------------------------------------------------------------------------


def _blank_status(stage: str) -> dict[str, Any]:
    return {"stage": str(stage), "state": StageState.PENDING.value, "attempt": 0, "host": None, "pid": None,
            "pgid": None, "pid_start": None, "launcher": None, "world_size": None, "started_at": None,
            "ended_at": None, "updated_at": None, "exit_code": None, "signal": None, "error_class": None, "error": None,
            "hint": None, "result": None, "synced": None, "boot": None, "attempts": []}


def read_status(run: RunDir, stage: str) -> dict[str, Any]:
    """A stage's status.json (a PENDING blank when the stage never started)."""
    st = read_json(run.status_path(stage))
    base = _blank_status(stage)
    if st:
        base.update(st)
    return base


@contextlib.contextmanager
def run_lock(run: RunDir) -> Iterator[None]:
    """The per-run lock every status write holds (short: one read-modify-write)."""
    run.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _finish_attempt(st: dict[str, Any]) -> None:
    rec = {k: st.get(k) for k in ATTEMPT_FIELDS}
    attempts = [a for a in st.get("attempts", []) if a.get("attempt") != rec["attempt"]]
    attempts.append(rec)
    st["attempts"] = attempts


def set_status_no_lock(run: RunDir, stage: str, state: StageState | str, *, attempt: int | None = None,
                       **fields: Any) -> dict[str, Any]:
    """Write a stage's state; the caller holds `run_lock`. See set_status."""
    state = StageState(state)
    st = read_status(run, stage)
    cur = StageState(st["state"])
    if attempt is not None and attempt != st["attempt"]:
        return st  # a writer of an older attempt: the newer attempt wins
    if cur.is_terminal() or _ORDER[state] < _ORDER[cur]:
        return st  # never backwards; a terminal state is final within its attempt
    now = time.time()
    st.update({k: v for k, v in fields.items() if k in _blank_status(stage) and k not in ("attempts", "state")})
    st["state"] = state.value
    st["updated_at"] = now
    if state == StageState.RUNNING and not st.get("started_at"):
        st["started_at"] = now
    if state.is_terminal():
        st["ended_at"] = now
        if not st.get("started_at") and state != StageState.SKIPPED:
            st["started_at"] = now
        _finish_attempt(st)
    atomic_write_json(run.status_path(stage), st)
    return st


def set_status(run: RunDir, stage: str, state: StageState | str, *, attempt: int | None = None,
               **fields: Any) -> dict[str, Any]:
    """The one function through which a stage's state changes (under the run lock).

    `attempt`: the attempt the writer belongs to; a write for another attempt is ignored. Moving to an
    earlier state, or away from a terminal one, is ignored too. Returns the status now on disk.
    """
    with run_lock(run):
        return set_status_no_lock(run, stage, state, attempt=attempt, **fields)


def set_running(run: RunDir, stage: str, *, attempt: int, host: str, pid: int, **fields: Any) -> dict[str, Any]:
    """Enter RUNNING (stamps started_at) with the worker's host and pid."""
    fields.setdefault("pgid", _pgid(pid))
    fields.setdefault("pid_start", pid_start_time(pid))
    return set_status(run, stage, StageState.RUNNING, attempt=attempt, host=host, pid=pid, **fields)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def begin_attempt(run: RunDir, stage: str, *, host: str | None = None, pid: int | None = None,
                  launcher: str | None = None, force: bool = False) -> int:
    """Start a new attempt (STARTING): the only move out of a terminal state. Returns its number.

    Raises StageLockedError when the current attempt is still live (not terminal) unless `force`.
    """
    with run_lock(run):
        st = read_status(run, stage)
        cur = StageState(st["state"])
        if not force and cur in (StageState.STARTING, StageState.RUNNING):
            raise StageLockedError(
                f"stage {stage} of run {run.id} is {cur.value} "
                f"(attempt {st['attempt']}, pid {st['pid']} on {st['host']})",
                at=f"{run.id}/{stage}", hint="wait for it, or `quantdeck cancel " + run.id + "`")
        attempts = list(st.get("attempts", []))
        new = _blank_status(stage)
        new.update({"attempt": int(st["attempt"]) + 1, "state": StageState.STARTING.value, "host": host,
                    "pid": pid, "launcher": launcher, "updated_at": time.time(), "attempts": attempts})
        atomic_write_json(run.status_path(stage), new)
        return new["attempt"]


def mark_synced(run: RunDir, stage: str, attempt: int) -> dict[str, Any]:
    """Record that what `attempt` of `stage` wrote is on the disk (engine.runs.durability); nothing for another
    attempt or a stage not done."""
    with run_lock(run):
        st = read_status(run, stage)
        if int(st["attempt"]) == attempt and StageState(st["state"]).is_done() and st.get("synced") is False:
            st["synced"] = True
            atomic_write_json(run.status_path(stage), st)
        return st


def mark_skipped(run: RunDir, stage: str, reason: str) -> dict[str, Any]:
    with run_lock(run):
        st = read_status(run, stage)
        if StageState(st["state"]).is_done():
            return st
        new = _blank_status(stage)
        new.update({"attempt": int(st["attempt"]) + 1, "attempts": st.get("attempts", [])})
        atomic_write_json(run.status_path(stage), new)
        return set_status_no_lock(run, stage, StageState.SKIPPED, result={"skipped": reason})


def reconcile_stage(run: RunDir, stage: str,
                    is_alive: Callable[[str | None, int | None, str | None], bool] | None = None,
                    *, error_class: str = "worker-lost", error: str | None = None,
                    hint: str | None = None, **fields: Any) -> dict[str, Any]:
    """A non-terminal stage whose worker is gone becomes FAILED_WORKER. `is_alive(host, pid, pid_start)`
    defaults to a local pid check. Never moves a status backwards. Returns the status now on disk."""
    check = is_alive or (lambda host, pid, start: pid_alive(pid, start))
    st = read_status(run, stage)
    state = StageState(st["state"])
    if state.is_terminal() or state == StageState.PENDING:
        return st
    if st.get("pid") and check(st.get("host"), st.get("pid"), st.get("pid_start")):
        return st
    if not st.get("pid") and state == StageState.STARTING and time.time() - (st.get("updated_at") or 0) < 60:
        return st  # still starting: no pid recorded yet
    return set_status(run, stage, StageState.FAILED_WORKER, attempt=st["attempt"], error_class=error_class,
                      error=error or f"worker pid {st.get('pid')} on {st.get('host')} is gone without a final status",
                      hint=hint, **fields)


# --- the live-worker locks --------------------------------------------------------------------------------


def stage_lock(run: RunDir, stage: str) -> FileLock:
    """The lock a live worker of `stage` holds; acquiring raises StageLockedError while another lives."""
    return FileLock(run.worker_lock_path(stage), f"stage {stage} of run {run.id}",
                    hint=f"a worker is live; wait for it or `quantdeck cancel {run.id}`")


def driver_lock(run: RunDir) -> FileLock:
    """The lock of the process driving the run's plan (one driver per run)."""
    return FileLock(run.path / "driver.lock", f"run {run.id}",
                    hint=f"it is running; follow it with `quantdeck logs {run.id} -f` or `quantdeck cancel {run.id}`")


def output_lock(workdir: str | os.PathLike, output: str) -> FileLock:
    """The lock on an output path: two live runs never write the same output."""
    import hashlib

    key = hashlib.sha256(str(output).encode()).hexdigest()[:16]
    return FileLock(Path(workdir) / "locks" / f"output-{key}.lock", f"output {output}",
                    hint="another run is writing it; wait, cancel it, or set target.output elsewhere")


def is_run_id(text: str) -> bool:
    return bool(_ID_RE.match(text))
