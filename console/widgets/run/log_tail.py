"""The log tail of the selected stage; follows new lines (auto-scroll) and keeps the last few hundred."""

from __future__ import annotations

from textual.widgets import Log


class LogTail(Log):
    def __init__(self, **kw) -> None:
        super().__init__(max_lines=500, auto_scroll=True, **kw)
        self.stage: str | None = None

    def on_mount(self) -> None:
        # anchored: the layout keeps the newest line in view (lines written before the widget has its size
        # included) until the operator scrolls up; at the end again, it follows again
        self.anchor()

    def show_lines(self, stage: str, lines: list[str], reset: bool) -> None:
        if reset or stage != self.stage:
            self.clear()
            self.stage = stage
            self.border_title = f"log · {stage}"
        if lines:
            self.write_lines(lines)
