"""The one table of named operator actions: key, footer label, help text, palette text.

App methods are `action_<name with _>`; keymap.py binds keys to these names; the command palette and the
help screen list them from here, so the three never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActionSpec:
    name: str
    key: str
    label: str
    help: str
    show: bool = True
    priority: bool = False
    needs_run: bool = False  # disabled when no run is attached


ACTIONS: dict[str, ActionSpec] = {
    a.name: a
    for a in (
        ActionSpec("resume", "r", "Resume", "Resume the run: the first stage not done, from its first unit not done",
                   needs_run=True),
        ActionSpec("export_only", "e", "Export",
                   "Export-only: export → inject-mtp → copy-extras → validate from the saved amax snapshot",
                   needs_run=True),
        ActionSpec("validate_only", "v", "Validate",
                   "Validate-only: check saved state (amax snapshot, outputs), running nothing heavy", needs_run=True),
        ActionSpec("cancel", "c", "Cancel", "Cancel the running stage (asks first); the run can be resumed later",
                   needs_run=True),
        ActionSpec("new_run", "n", "New", "Start a new run from a recipe file"),
        ActionSpec("history", "h", "History", "The run-history table; Enter opens a run, / filters, s sorts"),
        ActionSpec("logs", "l", "Logs", "The full log of the selected stage", needs_run=True),
        ActionSpec("help", "question_mark", "Help", "This help"),
        ActionSpec("quit", "q", "Quit", "Quit the console (runs go on; reopening re-attaches)"),
    )
}
