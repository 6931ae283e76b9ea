"""One run: its quality figures (validate's worst tensor, eval's KLD and top-1), its attempts per stage (host,
times, error class and text), the fix note (editable), artifacts."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from console import format as fmt
from console.models import RunDetailView
from console.widgets.run.quality_panel import quality_lines
from console.widgets.run.stage_table import STATE_STYLE


class RunDetailScreen(Screen):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("f", "edit_note", "Edit fix")]

    def __init__(self, run_id: str) -> None:
        super().__init__()
        self.run_id = run_id
        self.detail: RunDetailView | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with VerticalScroll(id="detail"):
            yield Static("loading…", id="detail-head")
            yield DataTable(cursor_type="row", id="attempts")
            yield Static("", id="detail-error")
            yield Static("fix note (Enter saves):", classes="label")
            yield Input(placeholder="what fixed it, for the next operator", id="note")
            yield Static("", id="artifacts")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"run {self.run_id}"
        t = self.query_one("#attempts", DataTable)
        for c in ("stage", "#", "host", "pid", "started", "ended", "state", "error class"):
            t.add_column(c, key=c)
        t.focus()

    def show_detail(self, d: RunDetailView) -> None:
        self.detail = d
        r = d.row
        head = Text()
        head.append(f"run {r.run_id}", style="bold").append(f"   {fmt.clock_time(r.created, True)}  ", style="dim")
        head.append(f"{r.model or '-'} → {r.target or '-'}  calib {r.calib or '-'}  commit {r.commit[:8] or '-'}\n")
        head.append("result ", style="dim").append(r.result or "-", style=STATE_STYLE.get(r.result, "bold"))
        if r.root_cause:
            head.append("   root cause ", style="dim").append(r.root_cause, style="yellow")
        if d.run_dir:
            head.append(f"\n{d.run_dir}", style="dim")
        worst, where, ev = quality_lines(d.quality, max(self.size.width - 30, 24))
        head.append("\n").append_text(worst).append("  ").append_text(where).append("\n").append_text(ev)
        self.query_one("#detail-head", Static).update(head)
        t = self.query_one("#attempts", DataTable)
        t.clear()
        for i, a in enumerate(d.attempts):
            t.add_row(a.stage, str(a.attempt), a.host or "-", str(a.pid or "-"), fmt.clock_time(a.started_at),
                      fmt.clock_time(a.ended_at), Text(a.state, style=STATE_STYLE.get(a.state, "")),
                      a.error_class or "", key=f"{a.stage}#{a.attempt}#{i}")
        errs = Text()
        for a in d.attempts:
            if a.error or a.error_class:
                errs.append(f"{a.stage} #{a.attempt} ", style="bold").append(f"{a.error_class}: ", style="red")
                errs.append(fmt.ellipsize(a.error, 400) + "\n")
        self.query_one("#detail-error", Static).update(errs or Text("no errors recorded", style="dim green"))
        note = self.query_one("#note", Input)
        if not note.has_focus:
            note.value = r.fix
        arts = Text("artifacts\n", style="bold")
        for p in d.artifacts or ("(none yet)",):
            arts.append(f"  {p}\n", style="" if d.artifacts else "dim")
        self.query_one("#artifacts", Static).update(arts)

    def action_edit_note(self) -> None:
        self.query_one("#note", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "note":
            self.app.save_note(self.run_id, event.value.strip())  # type: ignore[attr-defined]
            self.query_one("#attempts", DataTable).focus()
