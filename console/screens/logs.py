"""The whole log of one stage of the run, following while it grows."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Log


class LogScreen(Screen):
    BINDINGS = [Binding("escape,l", "app.pop_screen", "Back")]

    def __init__(self, run_id: str, stage: str, lines: list[str]) -> None:
        super().__init__()
        self.run_id, self.stage, self.lines = run_id, stage, lines

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        yield Log(max_lines=20000, auto_scroll=True, id="full-log")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"log · {self.run_id} · {self.stage}"
        self.query_one(Log).write_lines(self.lines or ["(no log lines yet)"])

    def append(self, stage: str, lines: list[str]) -> None:
        if stage == self.stage and lines:
            self.query_one(Log).write_lines(lines)
