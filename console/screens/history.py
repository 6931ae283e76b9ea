"""The run-history table (kept by the tool): sortable (`s`, or click a header), filterable (`/`)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from console import format as fmt
from console.models import HistoryRow
from engine.core.names import StageState

COLUMNS = ("run", "date", "commit", "model", "target", "calib", "result", "KLD", "top-1", "root cause", "fix")
_SORT_KEYS = {
    "run": lambda r: r.run_id, "date": lambda r: r.created, "commit": lambda r: r.commit,
    "model": lambda r: r.model, "target": lambda r: r.target, "calib": lambda r: r.calib,
    "result": lambda r: r.result, "root cause": lambda r: r.root_cause, "fix": lambda r: r.fix,
    # runs without eval figures sort below every figure, whichever way
    "KLD": lambda r: (r.kld is not None, r.kld or 0.0), "top-1": lambda r: (r.top1 is not None, r.top1 or 0.0),
}
_RESULT_STYLE = {StageState.SUCCEEDED: "green", StageState.FAILED: "bold red", StageState.FAILED_WORKER: "bold red",
                 StageState.CANCELLED: "yellow", StageState.RUNNING: "cyan"}


def row_matches(row: HistoryRow, needle: str) -> bool:
    """Every whitespace-separated word of `needle` appears somewhere in the row (case-insensitive)."""
    hay = " ".join((row.run_id, fmt.clock_time(row.created, True), row.commit, row.model, row.target, row.calib,
                    row.result, row.root_cause, row.fix)).lower()
    return all(w in hay for w in needle.lower().split())


class HistoryScreen(Screen):
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("escape", "back", "Back"),
        Binding("enter", "open", "Open", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: tuple[HistoryRow, ...] = ()
        self.needle = ""
        self.sort_col = "date"
        self.sort_reverse = True

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        yield Input(placeholder="filter: words that every shown row contains (Enter keeps, Esc clears)",
                    id="filter")
        yield DataTable(cursor_type="row", zebra_stripes=True, id="history")
        yield Static("", id="history-count")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "history"
        table = self.query_one(DataTable)
        for c in COLUMNS:
            table.add_column(c, key=c)
        self.query_one("#filter", Input).display = False
        table.focus()

    def show_rows(self, rows: tuple[HistoryRow, ...]) -> None:
        self.rows = rows
        self._render_rows()

    def visible_rows(self) -> list[HistoryRow]:
        rows = [r for r in self.rows if row_matches(r, self.needle)]
        rows.sort(key=_SORT_KEYS[self.sort_col], reverse=self.sort_reverse)
        return rows

    def _render_rows(self) -> None:
        table = self.query_one(DataTable)
        keep = None
        if table.row_count and table.cursor_row >= 0:
            try:
                keep = table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value
            except Exception:  # noqa: BLE001
                keep = None
        table.clear()
        rows = self.visible_rows()
        for r in rows:
            table.add_row(
                r.run_id, fmt.clock_time(r.created, True), r.commit[:8] or "-", r.model or "-", r.target or "-",
                r.calib or "-", Text(r.result or "-", style=_RESULT_STYLE.get(r.result, "")),
                f"{r.kld:.4f}" if r.kld is not None else "-", f"{r.top1:.1%}" if r.top1 is not None else "-",
                fmt.ellipsize(r.root_cause or "-", 24), fmt.ellipsize(r.fix or "", 24), key=r.run_id)
        if keep is not None and keep in {r.run_id for r in rows}:
            table.move_cursor(row=table.get_row_index(keep))
        arrow = "↓" if self.sort_reverse else "↑"
        total = fmt.plural(len(self.rows), "run")
        shown = f"{len(rows)} of {total}" if self.needle else fmt.plural(len(rows), "run")
        self.query_one("#history-count", Static).update(
            Text(f"{shown} · sorted by {self.sort_col} {arrow}" + (f" · filter: {self.needle}" if self.needle else ""),
                 style="dim"))

    @property
    def selected_run(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.needle = event.value.strip()
            self._render_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.query_one(DataTable).focus()
            if not self.needle:
                event.input.display = False

    def action_sort(self) -> None:
        i = COLUMNS.index(self.sort_col)
        self.sort_col = COLUMNS[(i + 1) % len(COLUMNS)]
        self.sort_reverse = self.sort_col == "date"
        self._render_rows()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        col = str(event.column_key.value)
        if col == self.sort_col:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_col, self.sort_reverse = col, False
        self._render_rows()

    def action_back(self) -> None:
        box = self.query_one("#filter", Input)
        if box.has_focus or self.needle:
            box.value = ""
            self.needle = ""
            box.display = False
            self.query_one(DataTable).focus()
            self._render_rows()
            return
        self.app.pop_screen()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_open(self) -> None:
        run_id = self.selected_run
        if run_id:
            self.app.open_run_detail(run_id)  # type: ignore[attr-defined]
