"""The one view of a run, for the CLI and the console: every stage's status with its latest progress (RunView,
StageView), built from the run dir, reconciling stages whose local worker vanished; on request also the calibration
and quality figures the console shows (engine.runs.figures).

A RUNNING stage is *stalled* when one of its ranks still at work has written no event for the run's
`[run] stall_after_s` (calibrate and eval report at least once a minute while working, so silence means trouble).
A rank that has finished its share only waits for the others and never counts as quiet; a rank that has not
reported in this attempt yet is silent since the stage entered RUNNING. `silent_s` is the longest silence among
the ranks at work; `quiet_ranks` names the ranks silent past the threshold (rank, host, pid, silent_s)."""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.core.locks import driver_alive, this_host
from engine.core.names import StageName, StageState
from engine.runs.figures import CalibView, FigureReader, QualityView
from engine.runs.progress_merge import RankActivity, StageProgress
from engine.runs.rundir import RunDir, read_status, reconcile_stage
from engine.runs.store import run_result


@dataclass(frozen=True)
class StageView:
    """One stage: its status.json (state, attempt, host, pid, times, error), its latest progress and its silence.
    The properties are the progress figures a table shows, derived here once for the CLI and the console."""

    name: str
    state: StageState
    attempt: int = 0
    host: str | None = None
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    error_class: str | None = None
    error: str | None = None
    hint: str | None = None
    result: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None  # the latest progress (unit, done, total, rate, eta_s, …), summed over
    # ranks (engine.runs.progress_merge: then also world and ranks: [{rank, host, done, total, rate, eta_s}, …])
    attempts: list[dict[str, Any]] = field(default_factory=list)
    stalled: bool = False  # RUNNING, and a rank at work silent for stall_after_s (module doc)
    silent_s: float | None = None  # RUNNING: the longest silence among its ranks at work
    quiet_ranks: list[dict[str, Any]] = field(default_factory=list)  # [{rank, host, pid, silent_s}, …]
    nodes: tuple[str, ...] = ()  # a distributed stage's nodes (the plan's); not part of to_json

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["nodes"]
        return d

    def _p(self, key: str) -> Any:
        return (self.progress or {}).get(key)

    @property
    def unit(self) -> str:
        return self._p("unit") or ""

    @property
    def total(self) -> float:
        return self._p("total") or 0

    @property
    def done(self) -> float:
        """Units done; a stage done (or skipped) counts all of them, whatever its last report said."""
        done, total = self._p("done") or 0, self.total
        return total if StageState(self.state).is_done() and total and done < total else done

    @property
    def rate(self) -> float | None:
        return self._p("rate")

    @property
    def rate_unit(self) -> str:
        """"B" when the progress counts bytes too (the rate is bytes/s), else the unit."""
        return "B" if self._p("bytes_total") else self.unit

    @property
    def eta_s(self) -> float | None:
        return self._p("eta_s")

    @property
    def label(self) -> str:
        return self._p("label") or ""

    @property
    def ranks(self) -> int:
        """The ranks of a stage run on several (0 for one)."""
        world = int(self._p("world") or 0)
        return world if world > 1 else 0

    @property
    def rank_parts(self) -> tuple[tuple[int, str, float, float], ...]:
        """(rank, host, done, total) of each rank of a distributed stage's progress."""
        return tuple((int(r.get("rank") or 0), str(r.get("host") or ""), r.get("done") or 0, r.get("total") or 0)
                     for r in self._p("ranks") or ())

    @property
    def hosts(self) -> tuple[str, ...]:
        """Where it runs: a distributed stage's nodes, else its host."""
        return self.nodes or ((self.host,) if self.host else ())

    @property
    def quiet_rank_ids(self) -> tuple[int, ...]:
        """The ranks silent past stall_after_s."""
        return tuple(int(q["rank"]) for q in self.quiet_ranks)

    @property
    def running(self) -> bool:
        return self.state in (StageState.RUNNING, StageState.STARTING)


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
    if st.get("state") != StageState.RUNNING:
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
    """A run: its stages, its result (a StageState: RUNNING, SUCCEEDED, FAILED, CANCELLED or PENDING), whether its
    driver lives, its run.json; `calib` and `quality` only when asked for (engine.api status(figures=True))."""

    id: str
    run_dir: str
    result: StageState
    driver_alive: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    stages: tuple[StageView, ...] = ()
    calib: CalibView | None = None  # with a calibrate stage
    quality: QualityView | None = None  # with a validate or eval stage

    def to_json(self) -> dict[str, Any]:
        """What `quantdeck status --json` prints of it."""
        return {"id": self.id, "run_dir": self.run_dir, "result": self.result, "driver_alive": self.driver_alive,
                "meta": copy.deepcopy(self.meta), "stages": [s.to_json() for s in self.stages]}

    @property
    def model(self) -> str:
        return self.meta.get("model") or ""

    @property
    def target(self) -> str:
        target = self.meta.get("target") or ""
        return json.dumps(target) if isinstance(target, dict) else target

    @property
    def recipe(self) -> str:
        return self.meta.get("recipe_path") or ""

    @property
    def live(self) -> bool:
        """Its driver lives, or a worker process does."""
        return bool(self.driver_alive) or any(s.running for s in self.stages)

    @property
    def has_amax(self) -> bool:
        """Calibration finished: an amax snapshot exists, export-only makes sense."""
        cal = self.stage(StageName.CALIBRATE)
        return cal is not None and cal.state == StageState.SUCCEEDED

    def stage(self, name: str) -> StageView | None:
        return next((s for s in self.stages if s.name == name), None)

    @property
    def current(self) -> StageView | None:
        """The stage to look at: the running one, else the first not done, else the last."""
        return next((s for s in self.stages if s.running), None) \
            or next((s for s in self.stages if not StageState(s.state).is_done()), None) \
            or (self.stages[-1] if self.stages else None)

    @property
    def all_done(self) -> bool:
        return bool(self.stages) and all(StageState(s.state).is_done() for s in self.stages)


def reconcile_local(rd: RunDir) -> None:
    """Mark a stage FAILED_WORKER when its worker ran on this host and is gone (and no driver lives)."""
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
    running = st.get("state") == StageState.RUNNING
    stall = stall_of(st, sp.activity(attempt, world), stall_after_s) if running else None
    return prog, stall


def stage_stall(rd: RunDir, name: str, progress: StageProgress | None = None) -> Stall | None:
    """The silence of one stage of a run now (None unless it is RUNNING); `progress` keeps offsets across calls."""
    return _progress(progress or StageProgress(rd.stage_dir(name)), read_status(rd, name), rd.stall_after_s())[1]


def run_view(rd: RunDir, cache: ProgressCache | None = None, figures: FigureReader | None = None) -> RunView:
    """The run now (reconciling a vanished local worker when no driver lives); `cache` keeps each stage's rank file
    offsets across calls; with `figures`, also the calibration and quality figures."""
    alive = driver_alive(rd)
    if not alive:
        reconcile_local(rd)
    stages = []
    after = rd.stall_after_s()
    plan = rd.read_plan()
    for ps in plan.get("stages", []):
        name = ps["name"]
        st = read_status(rd, name)
        sp = cache.stage(rd.stage_dir(name)) if cache is not None else StageProgress(rd.stage_dir(name))
        prog, stall = _progress(sp, st, after)
        stages.append(StageView(name=name, state=StageState(st["state"]), attempt=int(st["attempt"]),
                                host=st.get("host"), pid=st.get("pid"), started_at=st.get("started_at"),
                                ended_at=st.get("ended_at"), error_class=st.get("error_class"), error=st.get("error"),
                                hint=st.get("hint"), result=st.get("result"), progress=prog,
                                attempts=list(st.get("attempts", [])), stalled=bool(stall and stall.stalled),
                                silent_s=stall.silent_s if stall else None,
                                quiet_ranks=stall.quiet_ranks if stall else [],
                                nodes=tuple(ps.get("nodes") or ()) if ps.get("distributed") else ()))
    result = run_result([s.state for s in stages])
    if alive and result == StageState.PENDING:
        result = StageState.RUNNING  # the driver is between two stages
    view = RunView(id=rd.id, run_dir=str(rd.path), result=result, driver_alive=alive, meta=rd.read_meta(),
                   stages=tuple(stages))
    if figures is None:
        return view
    return replace(view, calib=figures.calib(rd, view, plan), quality=figures.quality(view.stages, plan))
