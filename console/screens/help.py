"""Help: every key and what it does, from the one action table."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from console.actions import ACTIONS


def key_label(key: str) -> str:
    return {"question_mark": "?", "slash": "/", "escape": "Esc", "enter": "Enter"}.get(key, key)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "close", "Close")]

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        super().__init__()
        self.keys = keys or {a.name: a.key for a in ACTIONS.values()}

    def compose(self) -> ComposeResult:
        table = Table(box=None, show_header=False, padding=(0, 1))
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for a in ACTIONS.values():
            table.add_row(key_label(self.keys.get(a.name, a.key)), a.help)
        for k, h in (("Tab", "Dashboard: the fleet per GPU (one row per GPU), Tab or Esc folds it back"),
                     ("/", "History: filter rows"), ("s", "History: sort by the next column"),
                     ("Enter", "History: open a run (attempts, errors, fix note, artifacts)"),
                     ("ctrl+p", "Command palette: the same actions, by name"), ("Esc", "Back")):
            table.add_row(k, h)
        with VerticalScroll(id="dialog"):
            yield Static("[b]quantdeck console — keys[/b]  (greyed keys in the footer are not possible now)\n")
            yield Static(table)

    def action_close(self) -> None:
        self.dismiss(None)
