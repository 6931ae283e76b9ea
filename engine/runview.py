"""Views of a run for the console and CLI: every stage's status with its latest progress (RunView/StageView),
built from the run dir, reconciling stages whose local worker vanished."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.events import read_events
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
    progress: dict[str, Any] | None  # the latest progress event's fields (unit, done, total, rate, eta_s, …)
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


def _latest_progress(path: Path, tail: int = 65536) -> dict[str, Any] | None:
    try:
        size = path.stat().st_size
    except OSError:
        return None
    start = max(0, size - tail)
    evs, _ = read_events(path, start)
    if start:
        evs = evs[1:]  # the first line may be cut
    last = None
    for ev in evs:
        if ev.kind == "progress":
            last = ev.data
    return last


def _view(rd: RunDir) -> RunView:
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
                                result=st.get("result"), progress=_latest_progress(rd.events_path(name)),
                                attempts=list(st.get("attempts", []))))
    result = run_result([s.state for s in stages])
    if alive and result == "PENDING":
        result = "RUNNING"  # the driver is between two stages
    return RunView(id=rd.id, run_dir=str(rd.path), result=result, driver_alive=alive, meta=rd.read_meta(),
                   stages=stages)
