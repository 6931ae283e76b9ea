"""Calibration detail: layer l/L with a progress bar, samples, tokens/s, ETA, expert coverage, each rank's layer."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import ProgressBar, Static

from console import format as fmt
from engine.api import CalibView


class CalibPanel(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("no calibration in this run", id="calib-text")
        yield ProgressBar(total=1, show_eta=False, id="calib-bar")

    def on_resize(self) -> None:
        # the bar rounds its fill to the half cells of the width it has when set: a value set before the layout
        # gave it its width is drawn again at that width, so the fill never depends on when the run was read
        progress = self.query_one("#calib-bar", ProgressBar)
        progress.query_one("#bar").percentage = progress.percentage  # type: ignore[attr-defined]

    def show_calib(self, calib: CalibView | None, state: str = "") -> None:
        text = self.query_one("#calib-text", Static)
        bar = self.query_one("#calib-bar", ProgressBar)
        if calib is None:
            text.update(Text("no calibration stage in this run", style="dim"))
            bar.update(total=1, progress=0)
            return
        t = Text()
        t.append("layer ", style="dim").append(f"{calib.layer}/{calib.layers}", style="bold")
        t.append("  samples ", style="dim").append(str(calib.samples))
        t.append("\ntok ", style="dim").append(fmt.rate(calib.tokens_per_s, "tok"))
        t.append("  ETA ", style="dim").append(fmt.duration(calib.eta_s))
        t.append("\nexperts ", style="dim")
        if calib.experts_total:
            low_style = "bold yellow" if calib.experts_low else "green"
            t.append(f"{calib.experts_low}/{calib.experts_total}", style=low_style)
            t.append(f" saw <{calib.min_tokens} tok" if calib.min_tokens else " under-covered", style="dim")
        else:
            t.append("-")
        ranks = fmt.rank_line(calib.rank_parts, calib.ranks, width=2 * max(self.size.width, 20) - 8)  # ≤ 2 lines
        if ranks:
            t.append("\n" + ranks, style="dim")
        if state:
            t.append(f"\n{state.lower()}", style="dim")
        text.update(t)
        bar.update(total=max(calib.layers, 1), progress=calib.layer)
