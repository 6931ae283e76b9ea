"""The stage contract.

A stage is a thin adapter: it reads its resolved parameters from the plan (`ctx.params`, built from the
recipe by engine.runs.plan) and calls a library function that takes an EventSink (the same function the
matching CLI command calls). It must be resumable by construction: on a rerun it keeps every unit that
is already done (a shard in the manifest with a matching sha256, an amax layer file, an S3 object whose
size and checksum match) and redoes the rest. It reports only through `ctx.sink`; it never relies on
stdout. It raises QuantdeckError subclasses for anything an operator can fix.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from engine.core.events import EventSink, NullSink
from engine.core.registry import Registry


def _no_run_meta(**fields: Any) -> None:
    """Outside a worker (validate-only, a test) there is no run.json to update."""


@dataclass
class StageContext:
    run_dir: Path  # <workdir>/runs/<run-id>
    stage_dir: Path  # <run_dir>/stages/<stage>
    params: dict[str, Any]  # this stage's resolved inputs/outputs/options from plan.json
    sink: EventSink = field(default_factory=NullSink)
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host: str = "local"
    mode: str = "run"  # run | validate-only
    # records fields in the run's run.json; the worker passes engine.runs.runner.update_meta for its run
    update_meta: Callable[..., None] = _no_run_meta
    ahead: Any = None  # what the stage began while its worker waited as a standby (Stage.ahead)


class Stage(Registry, abc.ABC):
    registry_kind: ClassVar[str] = "stage"
    registered_name: ClassVar[str]
    # True: may run under torchrun on every node (calibrate; convert/export split shards)
    distributed: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Do (or finish) the stage's work; return a small JSON-able summary for status.json."""

    def ahead(self, params: dict[str, Any]) -> Any:
        """Work this stage may begin while its worker waits, started ahead, for the driver's go
        (engine.runs.worker `standby`: beside the stages before it); what it returns reaches `run` as ctx.ahead,
        and its `stop()` ends that work where the go never comes. None: nothing to begin. Never writes to the run
        directory."""
        return None

    def check_saved(self, ctx: StageContext) -> list[str]:
        """validate-only: problems found in what this stage saved, running nothing heavy ([] = fine)."""
        return []
