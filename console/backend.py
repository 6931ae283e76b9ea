"""What the console asks of runs: a small ABC (its adapter over engine.api: console/api_backend.py).

Every method may block (SQLite, file reads, SSH) and is called from worker threads only. Methods raise
engine.core.errors.QuantdeckError subclasses (RunError, StageLockedError, ...) for operator errors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from console.models import HistoryRow, RunDetailView
from engine.api import RunView


class Backend(ABC):
    @abstractmethod
    def history(self) -> tuple[HistoryRow, ...]:
        """Every run in the store, newest first."""

    @abstractmethod
    def attach_target(self) -> str | None:
        """The run to attach to when none is named: a live one, else the latest; None when there is none."""

    @abstractmethod
    def read_run(self, run_id: str) -> RunView:
        """The run's state from its run dir (raises RunError when it does not exist)."""

    @abstractmethod
    def read_log(self, run_id: str, stage: str, offset: int) -> tuple[list[str], int]:
        """Log lines of a stage from byte `offset`; returns (lines, next offset)."""

    @abstractmethod
    def detail(self, run_id: str) -> RunDetailView: ...

    @abstractmethod
    def set_note(self, run_id: str, text: str) -> None: ...

    @abstractmethod
    def start(self, recipe_path: str) -> str:
        """Start a run from a recipe, detached; returns its id."""

    @abstractmethod
    def resume(self, run_id: str) -> str: ...

    @abstractmethod
    def export_only(self, run_id: str) -> str: ...

    @abstractmethod
    def validate_only(self, run_id: str) -> str: ...

    @abstractmethod
    def cancel(self, run_id: str) -> str: ...

    def close(self) -> None:
        return None
