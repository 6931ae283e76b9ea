"""Frozen view-models the console renders: fleet, history, a run's detail.

Adapters (console/api_backend.py, console/fleet.py) turn engine.api records and remote.telemetry samples into
these. A run itself is shown from engine.api's own view (RunView, StageView, CalibView, QualityView): one type
for the CLI and the console.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.api import QualityView

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
    kld: float | None = None  # the eval stage's mean KL divergence (None: no eval stage, or not run yet)
    top1: float | None = None  # and its top-1 agreement, a fraction

    def cells(self) -> tuple[str, ...]:
        return (self.run_id, "", self.commit, self.model, self.target, self.calib, self.result, self.root_cause,
                self.fix)


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
