"""Views of a run for the console and CLI: every stage's status with its latest progress (RunView/StageView),
built from the run dir, reconciling stages whose local worker vanished.

A RUNNING stage is *stalled* when one of its ranks still at work has written no event for the run's
`[run] stall_after_s` (calibrate and eval report at least once a minute while working, so silence means trouble).
A rank that has finished its share only waits for the others and never counts as quiet; a rank that has not
reported in this attempt yet is silent since the stage entered RUNNING. `silent_s` is the longest silence among
the ranks at work; `quiet_ranks` names the ranks silent past the threshold (rank, host, pid, silent_s)."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.runs.progress_merge import RankActivity, StageProgress
from engine.core.locks import driver_alive, this_host
from engine.runs.rundir import RunDir, read_status


@dataclass(frozen=True)
class StageView:
    name: str
    state: str
    attempt: int
    host: str | None
    pid: int | None
    started_at: float | None
    ended_at: float | None
    error_class: str | None
    error: str | None
    hint: str | None
    result: dict[str, Any] | None
    progress: dict[str, Any] | None  # the latest progress (unit, done, total, rate, eta_s, …), summed over ranks
    # (engine.runs.progress_merge: then also world and ranks: [{rank, host, done, total, rate, eta_s}, …])
    attempts: list[dict[str, Any]] = field(default_factory=list)
    stalled: bool = False  # RUNNING, and a rank at work silent for stall_after_s (module doc)
    silent_s: float | None = None  # RUNNING: the longest silence among its ranks at work
    quiet_ranks: list[dict[str, Any]] = field(default_factory=list)  # [{rank, host, pid, silent_s}, …]


@dataclass(frozen=True)
class Stall:
    """How long a RUNNING stage's ranks have been silent (see the module doc)."""

    stalled: bool
    silent_s: float
    quiet_ranks: list[dict[str, Any]]

    def line(self, stage: str) -> str:
        """"stage calibrate stalled: no event for 912s from rank 1 (pid 4242 on node1)"."""
        who = ", ".join(f"rank {q['rank']} (pid {q.get('pid') or '?'} on {q.get('host') or '?'})"
                        for q in self.quiet_ranks)
        return f"stage {stage} stalled: no event for {self.silent_s:.0f}s from {who or 'any rank'}"


def stall_of(st: dict[str, Any], activity: dict[int, RankActivity], stall_after_s: float,
             now: float | None = None) -> Stall | None:
    """The silence of a stage from its status and its ranks' activity (None unless it is RUNNING)."""
    if st.get("state") != "RUNNING":
        return None
    now = time.time() if now is None else now
    world = st.get("world_size") if isinstance(st.get("world_size"), int) and st["world_size"] > 0 else 1
    since = float(st.get("started_at") or st.get("updated_at") or now)
    silent: list[dict[str, Any]] = []
    for r in sorted(set(range(world)) | set(activity)):
        a = activity.get(r)
        if a is not None and a.finished:
            continue  # its share is done: it only waits for the others
        last = a.last_ts if a is not None else since
        silent.append({"rank": r, "host": a.host if a else (st.get("host") if r == 0 else None),
                       "pid": a.pid if a and a.pid else (st.get("pid") if r == 0 else None),
                       "silent_s": round(max(0.0, now - last), 1)})
    if not silent:
        return Stall(False, 0.0, [])
    quiet = [q for q in silent if q["silent_s"] >= stall_after_s]
    return Stall(bool(quiet), max(q["silent_s"] for q in silent), quiet)


@dataclass(frozen=True)
class RunView:
    id: str
    run_dir: str
    result: str  # RUNNING | SUCCEEDED | FAILED | CANCELLED | PENDING
    driver_alive: bool
    meta: dict[str, Any]
    stages: list[StageView]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)



def _reconcile_local(rd: RunDir) -> None:
    """Mark a stage FAILED_WORKER when its worker ran on this host and is gone (and no driver lives)."""
    from engine.runs.rundir import reconcile_stage

    if driver_alive(rd):
        return
    for name in rd.stage_names():
        st = read_status(rd, name)
        if st.get("host") in ("local", this_host()):
            reconcile_stage(rd, name)


class ProgressCache:
    """The StageProgress followers of the stages viewed, kept across views (one offset per rank file), so a
    caller viewing a run every second reads only what its event files gained. Thread-safe."""

    def __init__(self) -> None:
        self._by_dir: dict[Path, StageProgress] = {}
        self._lock = threading.Lock()

    def stage(self, stage_dir: Path) -> StageProgress:
        with self._lock:
            if stage_dir not in self._by_dir:
                self._by_dir[stage_dir] = StageProgress(stage_dir)
            return self._by_dir[stage_dir]


def _progress(sp: StageProgress, st: dict[str, Any],
              stall_after_s: float) -> tuple[dict[str, Any] | None, Stall | None]:
    """The stage's progress over all its ranks (engine.runs.progress_merge), for its current attempt, and its
    silence when it is RUNNING."""
    world = st.get("world_size")
    world = int(world) if isinstance(world, int) and world > 0 else None
    attempt = int(st["attempt"]) or None
    prog = sp.poll(attempt=attempt, world=world)
    stall = stall_of(st, sp.activity(attempt, world), stall_after_s) if st.get("state") == "RUNNING" else None
    return prog, stall


def stage_stall(rd: RunDir, name: str, progress: StageProgress | None = None) -> Stall | None:
    """The silence of one stage of a run now (None unless it is RUNNING); `progress` keeps offsets across calls."""
    return _progress(progress or StageProgress(rd.stage_dir(name)), read_status(rd, name), rd.stall_after_s())[1]


def _view(rd: RunDir, cache: ProgressCache | None = None) -> RunView:
    from engine.runs.store import run_result

    alive = driver_alive(rd)
    if not alive:
        _reconcile_local(rd)
    stages = []
    after = rd.stall_after_s()
    for name in rd.stage_names():
        st = read_status(rd, name)
        sp = cache.stage(rd.stage_dir(name)) if cache is not None else StageProgress(rd.stage_dir(name))
        prog, stall = _progress(sp, st, after)
        stages.append(StageView(name=name, state=st["state"], attempt=int(st["attempt"]), host=st.get("host"),
                                pid=st.get("pid"), started_at=st.get("started_at"), ended_at=st.get("ended_at"),
                                error_class=st.get("error_class"), error=st.get("error"), hint=st.get("hint"),
                                result=st.get("result"), progress=prog, attempts=list(st.get("attempts", [])),
                                stalled=bool(stall and stall.stalled), silent_s=stall.silent_s if stall else None,
                                quiet_ranks=stall.quiet_ranks if stall else []))
    result = run_result([s.state for s in stages])
    if alive and result == "PENDING":
        result = "RUNNING"  # the driver is between two stages
    return RunView(id=rd.id, run_dir=str(rd.path), result=result, driver_alive=alive, meta=rd.read_meta(),
                   stages=stages)
