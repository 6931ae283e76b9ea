"""The run's stages: state, progress bar, done/total, rate, ETA, nodes/ranks — one row per stage, updated in place
(a LineTable with a row cursor: the stage under it is the one whose log the dashboard shows). A stalled stage's
state reads "stalled 15m00s" (with its quiet ranks, for a stage of several), highlighted."""

from __future__ import annotations

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message

from console import format as fmt
from console.widgets.line_table import LineTable
from engine.api import RunView, StageView
from engine.core.names import StageState

STATE_STYLE = {
    StageState.PENDING: "dim", StageState.STARTING: "cyan", StageState.RUNNING: "bold cyan",
    StageState.SUCCEEDED: "green", StageState.SKIPPED: "dim green", StageState.FAILED: "bold red",
    StageState.FAILED_WORKER: "bold red", StageState.CANCELLED: "yellow",
}


STALLED_STYLE = "bold black on yellow"


class StageTable(LineTable):
    """One row per stage, keyed by its name, with a row cursor: the selected stage's log is the one shown."""

    COLUMNS = ("stage", "state", "progress", "done", "rate", "ETA", "nodes")
    BINDINGS = [Binding("up", "cursor_up", "Up", show=False), Binding("down", "cursor_down", "Down", show=False),
                Binding("home", "cursor_to(0)", show=False), Binding("end", "cursor_to(-1)", show=False)]
    show_cursor = True

    class Highlighted(Message):
        """The cursor is on stage `stage` (moved by the operator, or following the running stage)."""

        def __init__(self, stage: str) -> None:
            super().__init__()
            self.stage = stage

    def __init__(self, *, bar_width: int = 8, **kw) -> None:
        super().__init__(**kw)
        self.bar_width = bar_width
        self._current: str | None = None
        self.auto_follow = True  # the cursor follows the running stage until the operator moves it

    @property
    def selected_stage(self) -> str | None:
        return self._keys[self.cursor] if 0 <= self.cursor < len(self._keys) else None

    def move_cursor(self, row: int) -> None:
        row = min(max(row, 0), max(len(self._keys) - 1, 0))
        moved = row != self.cursor
        self.cursor = row
        self.scroll_to_row(row)
        self.refresh()
        if self._keys and moved:
            self.post_message(self.Highlighted(self._keys[row]))

    def show_run(self, run: RunView) -> None:
        names = [s.name for s in run.stages]
        fresh = self._keys != names
        self.set_rows({s.name: self._cells(s) for s in run.stages})
        cur = run.current.name if run.current is not None else None
        if fresh and names:  # a new plan: the cursor starts on the current stage
            self.cursor = names.index(cur) if cur in names else 0
            self.scroll_to_row(self.cursor)
            self.post_message(self.Highlighted(names[self.cursor]))
        elif cur is not None and self.auto_follow and cur != self._current:
            self.move_cursor(names.index(cur))
        self._current = cur

    def action_cursor_up(self) -> None:
        self.auto_follow = False
        self.move_cursor(self.cursor - 1)

    def action_cursor_down(self) -> None:
        self.auto_follow = False
        self.move_cursor(self.cursor + 1)

    def action_cursor_to(self, row: int) -> None:
        self.auto_follow = False
        self.move_cursor(row if row >= 0 else len(self._keys) - 1)

    def on_click(self, event: events.Click) -> None:
        self.auto_follow = False
        row = self.row_at(event.y)
        if row is not None:
            self.move_cursor(row)

    def _cells(self, s: StageView) -> tuple:
        frac = s.done / s.total if s.total else (1.0 if StageState(s.state).is_done() else 0.0)
        style = STATE_STYLE.get(s.state, "")
        state = Text(s.state.lower().replace("_", " "), style=style)
        if s.stalled:  # no event for stall_after_s: the row says so, with how long and which ranks
            quiet = f" r{','.join(map(str, s.quiet_rank_ids))}" if s.ranks and s.quiet_ranks else ""
            state = Text(f"stalled {fmt.duration(s.silent_s)}{quiet}", style=STALLED_STYLE)
        if s.attempt > 1:
            state.append(f" #{s.attempt}", style="dim")
        failed = s.state in (StageState.FAILED, StageState.FAILED_WORKER)
        prog = Text.assemble((fmt.bar(frac, self.bar_width), "red" if failed else "cyan"),
                             f" {frac * 100:3.0f}%")
        done = fmt.count(s.done, s.total)
        running = s.running
        return (Text(s.name, style="bold" if running else ""), state, prog, done,
                fmt.rate(s.rate, s.rate_unit or s.unit) if running and s.rate else "-",
                fmt.duration(s.eta_s) if running else "-",
                fmt.join_hosts(s.hosts, s.ranks))
