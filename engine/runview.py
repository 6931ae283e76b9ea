"""Views of a run for the console and CLI: every stage's status with its latest progress (RunView/StageView),
built from the run dir, reconciling stages whose local worker vanished."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.progress_merge import StageProgress
from engine.locks import driver_alive, this_host
from engine.rundir import RunDir, read_status


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
    # (engine.progress_merge: then also world and ranks: [{rank, host, done, total, rate, eta_s}, …])
    attempts: list[dict[str, Any]] = field(default_factory=list)


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
    from engine.rundir import reconcile_stage

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


def _progress(rd: RunDir, name: str, st: dict[str, Any], cache: ProgressCache | None) -> dict[str, Any] | None:
    """The stage's progress over all its ranks (engine.progress_merge), for its current attempt."""
    sp = cache.stage(rd.stage_dir(name)) if cache is not None else StageProgress(rd.stage_dir(name))
    world = st.get("world_size")
    return sp.poll(attempt=int(st["attempt"]) or None,
                   world=int(world) if isinstance(world, int) and world > 0 else None)


def _view(rd: RunDir, cache: ProgressCache | None = None) -> RunView:
    from engine.store import run_result

    alive = driver_alive(rd)
    if not alive:
        _reconcile_local(rd)
    stages = []
    for name in rd.stage_names():
        st = read_status(rd, name)
        stages.append(StageView(name=name, state=st["state"], attempt=int(st["attempt"]), host=st.get("host"),
                                pid=st.get("pid"), started_at=st.get("started_at"), ended_at=st.get("ended_at"),
                                error_class=st.get("error_class"), error=st.get("error"), hint=st.get("hint"),
                                result=st.get("result"), progress=_progress(rd, name, st, cache),
                                attempts=list(st.get("attempts", []))))
    result = run_result([s.state for s in stages])
    if alive and result == "PENDING":
        result = "RUNNING"  # the driver is between two stages
    return RunView(id=rd.id, run_dir=str(rd.path), result=result, driver_alive=alive, meta=rd.read_meta(),
                   stages=stages)
