"""The engine's facade: the only engine package the console and CLI import (besides engine.core.errors,
engine.core.names and engine.core.settings; an import-linter contract in pyproject.toml holds them to it).

`open_engine()` gives the local implementation (engine.api.local) of `Engine` (engine.api.engine). Runs are named
by id, unique id prefix or run dir path. Every method raises only QuantdeckError subclasses (listed per method) for
what an operator can fix; anything else is a bug. The CLI's single-purpose tools (convert, calibrate, export, eval,
inspect, s3, fixtures; engine.api.tools) run the same engine functions the stages run.

Importing this package is light (the CLI imports it at start): every other engine module, and torch, is imported
where it is used; the view and record types are imported on first access (`_LAZY`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.api.engine import Engine
from engine.api.local import LocalEngine, init_recipe, load_recipe, open_engine, raise_if_problems, write_recipe
from engine.api.tools import (
    build_fixture,
    build_trained_fixture,
    calibrate,
    calibration_available,
    checkpoint_totals,
    convert_start_early,
    evaluate,
    event_sink,
    export_checkpoint,
    format_eval_report,
    format_validate_report,
    import_converter,
    inject_mtp,
    inspect_checkpoint,
    is_amax_snapshot,
    record_start_files,
    refuse_other_model,
    render_inspection,
    s3_pull,
    s3_push,
    validate_amax,
    validate_checkpoint,
)
from engine.core.errors import PreflightError
from engine.core.names import StageState
from engine.core.procexit import end_process

if TYPE_CHECKING:
    from engine.core.events import Event
    from engine.runs.figures import CalibView, QualityView
    from engine.runs.progress_merge import StageRanks
    from engine.runs.runview import RunView, StageView
    from engine.runs.store import AttemptRecord, RunRecord

_LAZY = {  # public name → the module defining it, imported on first access (PEP 562)
    "RunView": "engine.runs.runview",  # a run: its stages, result, driver; status() gives one
    "StageView": "engine.runs.runview",  # one stage of a RunView
    "CalibView": "engine.runs.figures",  # RunView.calib: the calibrate stage's figures
    "QualityView": "engine.runs.figures",  # RunView.quality: validate's worst tensor, eval's KLD and top-1
    "StageRanks": "engine.runs.progress_merge",  # merges followed events into each stage's progress over its ranks
    "Event": "engine.core.events",  # what events() and follow() give
    "RunRecord": "engine.runs.store",  # a row of history()
    "AttemptRecord": "engine.runs.store",  # a row of attempts()
}

__all__ = [
    "AttemptRecord",
    "CalibView",
    "Engine",
    "Event",
    "LocalEngine",
    "PreflightError",
    "QualityView",
    "RunRecord",
    "RunView",
    "StageRanks",
    "StageState",
    "StageView",
    "__version__",
    "build_fixture",
    "build_trained_fixture",
    "calibrate",
    "calibration_available",
    "checkpoint_totals",
    "convert_start_early",
    "end_process",
    "evaluate",
    "event_sink",
    "export_checkpoint",
    "format_eval_report",
    "format_validate_report",
    "import_converter",
    "init_recipe",
    "inject_mtp",
    "inspect_checkpoint",
    "is_amax_snapshot",
    "load_recipe",
    "open_engine",
    "raise_if_problems",
    "record_start_files",
    "refuse_other_model",
    "render_inspection",
    "s3_pull",
    "s3_push",
    "validate_amax",
    "validate_checkpoint",
    "write_recipe",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

