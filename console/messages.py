"""Messages that cross widgets: facts posted by workers, handled on the event loop."""

from __future__ import annotations

from textual.message import Message

from console.models import HistoryRow, NodeView, RunDetailView
from engine.api import RunView


class FleetSampled(Message):
    """Telemetry for every node arrived (a dead node arrives as unreachable/stale, never as a delay)."""

    def __init__(self, nodes: tuple[NodeView, ...]) -> None:
        super().__init__()
        self.nodes = nodes


class RunRead(Message):
    """The run's state was read from its run dir."""

    def __init__(self, run: RunView) -> None:
        super().__init__()
        self.run = run


class LogLinesRead(Message):
    """New lines of the followed stage's log (reset=True: a new stage, replace the tail)."""

    def __init__(self, stage: str, lines: list[str], reset: bool = False) -> None:
        super().__init__()
        self.stage, self.lines, self.reset = stage, lines, reset


class HistoryLoaded(Message):
    def __init__(self, rows: tuple[HistoryRow, ...]) -> None:
        super().__init__()
        self.rows = rows


class RunDetailLoaded(Message):
    def __init__(self, detail: RunDetailView) -> None:
        super().__init__()
        self.detail = detail


class ActionFinished(Message):
    """An operator action (resume, export-only, ...) was handed to the engine."""

    def __init__(self, action: str, run_id: str, text: str) -> None:
        super().__init__()
        self.action, self.run_id, self.text = action, run_id, text


class ActionFailed(Message):
    def __init__(self, action: str, title: str, text: str, hint: str = "") -> None:
        super().__init__()
        self.action, self.title, self.text, self.hint = action, title, text, hint
