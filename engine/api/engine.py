"""The facade's `Engine` (engine.api re-exports it): what the console and CLI may ask of the engine, whatever runs
it; `open_engine()` gives its local implementation (engine.api.local). Runs are named by id, unique id prefix or run
dir path. Every method raises only QuantdeckError subclasses (listed per method) for what an operator can fix;
anything else is a bug."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.core.events import Event
    from engine.runs.runview import RunView
    from engine.runs.store import AttemptRecord, RunRecord


class Engine(abc.ABC):
    """What the console and CLI may ask of the engine."""

    @abc.abstractmethod
    def start(self, recipe_path: str, *, preflight: bool | None = None, launcher_factory: str | None = None,
              env: dict[str, str] | None = None, extra_checks: tuple = ()) -> str:
        """Create a run from a recipe and start its driver detached; returns the run id at once.
        `extra_checks`: more preflight checks (remote per-node ones). Raises RecipeError, PreflightError,
        StageLockedError (a live run owns the output)."""

    @abc.abstractmethod
    def resume(self, run: str, *, launcher_factory: str | None = None,
               on_wait: Callable[[str], None] | None = None) -> str:
        """Restart from the first stage not done. A driver that is only noticing its worker's death (a kill -9
        a moment ago) is waited for, a few seconds, and `on_wait(line)` told what is waited for. Raises
        RunError (unknown run, nothing to do), StageLockedError (its driver is live)."""

    @abc.abstractmethod
    def export_only(self, run: str, *, launcher_factory: str | None = None,
                    on_wait: Callable[[str], None] | None = None) -> str:
        """Re-run export → inject-mtp → copy-extras → validate from the saved amax snapshot (waits as resume).
        Raises RunError (no export stage / calibration not done), StageLockedError."""

    @abc.abstractmethod
    def validate_only(self, run: str) -> list[str]:
        """Check what the run saved (amax snapshot, partial and finished outputs), running nothing heavy
        and changing nothing; returns one line per problem ([] = fine). Raises RunError."""

    @abc.abstractmethod
    def cancel(self, run: str, *, launcher_factory: str | None = None) -> list[str]:
        """Stop the run's driver and live workers (their process groups), recording CANCELLED; returns the
        stages cancelled. Raises RunError."""

    @abc.abstractmethod
    def status(self, run: str, *, figures: bool = False) -> RunView:
        """Every stage's state, host, pid, attempt, times, error and latest progress (a distributed stage's
        summed over its ranks, with a per-rank breakdown: engine.runs.progress_merge). `figures`: also the
        calibration and quality figures (RunView.calib, .quality), read by offset across calls. Raises RunError."""

    @abc.abstractmethod
    def runs(self) -> list[RunView]:
        """Every run known to the store or under the default work dir, oldest first."""

    @abc.abstractmethod
    def quality(self, run: str) -> dict[str, float | None]:
        """The eval stage's figures of a run: {"kld_mean", "top1_agree"}, None where it has none (no eval stage,
        not run yet); a failed gate's come from its report. Raises RunError."""

    @abc.abstractmethod
    def plan(self, run: str) -> dict[str, Any]:
        """The run's plan.json. Raises RunError."""

    @abc.abstractmethod
    def events(self, run: str, stage: str, offset: int = 0, rank: int = 0) -> tuple[list[Event], int]:
        """Events of one stage (one rank) from byte `offset`; returns (events, next offset). Raises RunError."""

    @abc.abstractmethod
    def log(self, run: str, stage: str, offset: int = 0) -> tuple[str, int]:
        """The stage's log.txt from byte `offset`; returns (text, next offset). Raises RunError."""

    @abc.abstractmethod
    def history(self) -> list[RunRecord]:
        """The run-history table (store rows), oldest first."""

    @abc.abstractmethod
    def attempts(self, run: str) -> list[AttemptRecord]:
        """Every stage attempt of one run, in time order. Raises RunError."""

    @abc.abstractmethod
    def note(self, run: str, text: str) -> None:
        """Record the operator's fix note (store and run dir). Raises RunError."""

    @abc.abstractmethod
    def rescan(self, root: str) -> list[str]:
        """Rebuild the store from the run dirs under `root`; returns the run ids found."""

    @abc.abstractmethod
    def preflight(self, recipe_path: str) -> list[str]:
        """Cheap checks before any GPU is held; one line per failure with its fix ([] = ready).
        Raises RecipeError."""
