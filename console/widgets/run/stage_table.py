"""The run's stages: state, progress bar, done/total, rate, ETA, nodes/ranks — one row per stage, in place."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from console import format as fmt
from console.models import RunView, StageView

STATE_STYLE = {
    "PENDING": "dim", "STARTING": "cyan", "RUNNING": "bold cyan", "SUCCEEDED": "green", "SKIPPED": "dim green",
    "FAILED": "bold red", "FAILED_WORKER": "bold red", "CANCELLED": "yellow",
}


class StageTable(DataTable):
    COLUMNS = ("stage", "state", "progress", "done", "rate", "ETA", "nodes")

    def __init__(self, *, bar_width: int = 8, **kw) -> None:
        super().__init__(cursor_type="row", **kw)
        self.bar_width = bar_width
        self._rows: dict[str, tuple] = {}
        self._current: str | None = None
        self.auto_follow = True  # the cursor follows the running stage until the operator moves it

    def on_mount(self) -> None:
        self._ensure_columns()

    def _ensure_columns(self) -> None:
        if not self.columns:
            for c in self.COLUMNS:
                self.add_column(c, key=c)

    @property
    def selected_stage(self) -> str | None:
        if not self._rows or self.cursor_row < 0:
            return None
        try:
            return self.coordinate_to_cell_key((self.cursor_row, 0)).row_key.value
        except Exception:  # noqa: BLE001 - an empty/refreshing table has no selection
            return None

    def show_run(self, run: RunView) -> None:
        self._ensure_columns()
        names = [s.name for s in run.stages]
        fresh = list(self._rows) != names
        if fresh:  # a new plan: rebuild rows
            self.clear()
            self._rows = {}
        for s in run.stages:
            cells = self._cells(s)
            old = self._rows.get(s.name)
            if old is None:
                self.add_row(*cells, key=s.name)
            else:
                for col, new, prev in zip(self.COLUMNS, cells, old):
                    if str(new) != str(prev) or getattr(new, "style", None) != getattr(prev, "style", None):
                        self.update_cell(s.name, col, new, update_width=True)
            self._rows[s.name] = cells
        cur = run.current.name if run.current is not None else None
        if cur is not None and (fresh or (self.auto_follow and cur != self._current)):
            self.move_cursor(row=names.index(cur))
        self._current = cur

    def action_cursor_up(self) -> None:
        self.auto_follow = False
        super().action_cursor_up()

    def action_cursor_down(self) -> None:
        self.auto_follow = False
        super().action_cursor_down()

    def on_click(self) -> None:
        self.auto_follow = False

    def _cells(self, s: StageView) -> tuple:
        frac = s.done / s.total if s.total else (1.0 if s.state in ("SUCCEEDED", "SKIPPED") else 0.0)
        style = STATE_STYLE.get(s.state, "")
        state = Text(s.state.lower().replace("_", " "), style=style)
        if s.attempt > 1:
            state.append(f" #{s.attempt}", style="dim")
        prog = Text.assemble((fmt.bar(frac, self.bar_width), "red" if "FAIL" in s.state else "cyan"),
                             f" {frac * 100:3.0f}%")
        done = fmt.count(s.done, s.total)
        running = s.state in ("RUNNING", "STARTING")
        return (Text(s.name, style="bold" if running else ""), state, prog, done,
                fmt.rate(s.rate, s.rate_unit or s.unit) if running and s.rate else "-",
                fmt.duration(s.eta_s) if running else "-",
                fmt.join_hosts(s.hosts, s.ranks))
