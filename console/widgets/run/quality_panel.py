"""The output's quality figures: validate's worst tensor and its relative error against the source, eval's KL
divergence (mean) and top-1 agreement; "—" for a figure the run has not measured (yet)."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from engine.api import QualityView
from engine.core.names import StageState

DASH = "—"


def figure(value: float | None) -> str:
    """0.0912, 3.10e-05; None gives "—"."""
    if value is None or value != value:
        return DASH
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def percent(value: float | None) -> str:
    """A fraction (or a percentage already) as "97.4%"; None gives "—"."""
    if value is None or value != value:
        return DASH
    return f"{value * 100 if value <= 1 else value:.1f}%"


def tail(text: str, width: int) -> str:
    """The end of `text` in `width` cells ("…experts.17.down_proj"): a tensor's name says most at its end."""
    return text if len(text) <= width else "…" + text[len(text) - max(width - 1, 0):]


def quality_lines(q: QualityView | None, width: int) -> list[Text]:
    """Three lines: validate's worst error, the tensor it is in (or the stage's state), eval's figures."""
    q = q or QualityView()
    worst = Text("validate ", style="dim").append("worst ", style="dim")
    worst.append(figure(q.worst_rel_err), style="bold" if q.worst_rel_err is not None else "dim")
    if q.worst_rel_err is not None:
        worst.append(" rel. err", style="dim")
    if q.worst_tensor:
        where = Text(tail(q.worst_tensor, max(width, 12)))
    elif q.validate_state:
        where = Text(q.validate_state.lower().replace("_", " "), style="dim")
    else:
        where = Text("no validate stage", style="dim")
    ev = Text("eval ", style="dim").append("KLD ", style="dim")
    ev.append(figure(q.kld_mean), style="bold" if q.kld_mean is not None else "dim")
    ev.append("  top-1 ", style="dim")
    ev.append(percent(q.top1_agree), style="bold" if q.top1_agree is not None else "dim")
    if q.kld_mean is None and q.top1_agree is None and q.eval_state and q.eval_state != StageState.SUCCEEDED:
        ev.append(f"  {q.eval_state.lower().replace('_', ' ')}", style="dim")
    return [worst, where, ev]


def quality_text(q: QualityView | None, width: int) -> Text:
    return Text("\n").join(quality_lines(q, width))


class QualityPanel(Static):
    def __init__(self, **kw) -> None:
        super().__init__("", **kw)
        self.quality: QualityView | None = None

    def show_quality(self, q: QualityView | None) -> None:
        self.quality = q
        self.update(quality_text(q, self.size.width or 30))

    def on_resize(self) -> None:
        self.update(quality_text(self.quality, self.size.width or 30))

