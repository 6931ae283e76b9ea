"""Frozen view-models the console renders: fleet, run, stages, calibration, quality, history.

Adapters (console/backend.py, console/fleet.py) turn engine.api records and remote.telemetry samples into
these, so widgets never depend on engine or remote types directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from console.format import rank_line as fmt_rank_line

HOST_OK = "ok"
HOST_NO_GPU = "no GPU"
HOST_UNREACHABLE = "unreachable"
HOST_STALE = "stale"
HOST_CONNECTING = "connecting"  # no sample yet


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str
    mem_used_mib: float
    mem_total_mib: float
    util_pct: float | None = None
    temp_c: float | None = None


@dataclass(frozen=True)
class NodeView:
    name: str
    host: str
    state: str  # one of HOST_*
    sampled_at: float | None = None  # wall time of the last good sample
    gpus: tuple[GpuView, ...] = ()
    ram_used: int = 0
    ram_total: int = 0
    disk_free: int = 0
    disk_total: int = 0
    error: str = ""


@dataclass(frozen=True)
class StageView:
    name: str
    state: str  # a StageState value
    unit: str = ""
    done: float = 0
    total: float = 0
    rate: float | None = None
    rate_unit: str = ""
    eta_s: float | None = None
    hosts: tuple[str, ...] = ()
    ranks: int = 0
    attempt: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    error_class: str = ""
    error: str = ""
    label: str = ""
    rank_parts: tuple[tuple[int, str, float, float], ...] = ()  # distributed: (rank, host, done, total) each
    stalled: bool = False  # RUNNING, and a rank at work wrote no event for the run's stall_after_s
    silent_s: float | None = None  # RUNNING: the longest silence among its ranks at work
    quiet_ranks: tuple[int, ...] = ()  # the ranks silent past stall_after_s

    @property
    def rank_line(self) -> str:
        """"ranks 2: r0 12/30 node0 · r1 10/28 node1" for a stage of several ranks ("" otherwise)."""
        return fmt_rank_line(self.rank_parts, self.ranks)


@dataclass(frozen=True)
class QualityView:
    """The output's figures: validate's worst tensor against the source, eval's KL divergence and top-1
    agreement (None where the run has not measured them)."""

    worst_tensor: str = ""
    worst_rel_err: float | None = None
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1_agree: float | None = None  # a fraction, 0..1
    validate_state: str = ""  # the validate stage's state ("" without one)
    eval_state: str = ""  # the eval stage's state ("" without one)


@dataclass(frozen=True)
class CalibView:
    layer: int = 0
    layers: int = 0
    samples: int = 0
    tokens_per_s: float | None = None
    eta_s: float | None = None
    experts_total: int = 0
    experts_low: int = 0
    min_tokens: int = 0
    ranks: int = 0  # calibrate on several ranks: how many, and each one's (rank, host, layer, layers)
    rank_parts: tuple[tuple[int, str, float, float], ...] = ()


@dataclass(frozen=True)
class RunView:
    run_id: str
    run_dir: str
    state: str  # RUNNING | SUCCEEDED | FAILED | CANCELLED | PENDING ...
    model: str = ""
    target: str = ""
    recipe: str = ""
    stages: tuple[StageView, ...] = ()
    calib: CalibView | None = None
    live: bool = False  # a worker process is alive for this run
    has_amax: bool = False  # an amax snapshot exists: export-only makes sense
    updated_at: float = 0.0
    quality: QualityView | None = None

    def stage(self, name: str) -> StageView | None:
        for s in self.stages:
            if s.name == name:
                return s
        return None

    @property
    def current(self) -> StageView | None:
        """The stage to look at: the running one, else the first not done, else the last."""
        for s in self.stages:
            if s.state in ("RUNNING", "STARTING"):
                return s
        for s in self.stages:
            if s.state not in ("SUCCEEDED", "SKIPPED"):
                return s
        return self.stages[-1] if self.stages else None

    @property
    def all_done(self) -> bool:
        return bool(self.stages) and all(s.state in ("SUCCEEDED", "SKIPPED") for s in self.stages)


@dataclass(frozen=True)
class HistoryRow:
    run_id: str
    created: float
    commit: str = ""
    model: str = ""
    target: str = ""
    calib: str = ""
    result: str = ""
    root_cause: str = ""
    fix: str = ""

    def cells(self) -> tuple[str, ...]:
        return (self.run_id, "", self.commit, self.model, self.target, self.calib, self.result, self.root_cause, self.fix)


@dataclass(frozen=True)
class AttemptView:
    stage: str
    attempt: int
    host: str = ""
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    state: str = ""
    error_class: str = ""
    error: str = ""


@dataclass(frozen=True)
class RunDetailView:
    row: HistoryRow
    run_dir: str = ""
    attempts: tuple[AttemptView, ...] = ()
    artifacts: tuple[str, ...] = field(default_factory=tuple)
    quality: QualityView | None = None
