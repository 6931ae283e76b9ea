"""The fleet table: compact, one row per node with one small bar per GPU (its level the GPU's memory use), or, while
it has the focus, one row per node × GPU (memory bar, memory history, util); host RAM, disk and state either way.

A LineTable (not a DataTable): 4 nodes × 8 GPUs are 4 compact rows, ~35 detailed ones, re-rendered only where a
sample changed. A GPU whose rank went quiet (its stage stalled) is highlighted in both forms.
"""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.binding import Binding
from textual.message import Message

from console import format as fmt
from console.models import HOST_CONNECTING, HOST_NO_GPU, HOST_OK, HOST_STALE, HOST_UNREACHABLE, NodeView
from console.widgets.line_table import LineTable

HISTORY = 40
_STATE_STYLE = {HOST_OK: "green", HOST_NO_GPU: "cyan", HOST_STALE: "yellow", HOST_UNREACHABLE: "bold red",
                HOST_CONNECTING: "dim"}
QUIET_STYLE = "bold black on yellow"  # as the stage table's stalled row
_LEVELS = "▁▂▃▄▅▆▇█"

DETAIL_COLUMNS = ("node", "gpu", "memory", "history", "util", "RAM", "disk", "state")
COMPACT_COLUMNS = ("node", "GPUs", "memory", "util", "RAM", "disk", "state")

Quiet = dict[str, dict[int, int]]  # node name → {GPU index: rank} of the ranks that went quiet


def _mem_style(frac: float) -> str:
    return "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"


def level(frac: float) -> str:
    """One cell whose height is a GPU's memory use: ▁ (idle or nearly) to █ (full)."""
    frac = min(max(frac, 0.0), 1.0)
    return _LEVELS[min(int(frac * len(_LEVELS)), len(_LEVELS) - 1)]


def _ranks(ranks) -> str:
    return "r" + ",".join(str(r) for r in sorted(ranks))


class FleetTable(LineTable):
    """Rows are keyed by node (compact) or `node/gpu` (`node/-` without GPUs) when expanded. Focus expands it;
    leaving it (or Esc) folds it back."""

    BINDINGS = [Binding("escape", "fold", "Back", show=False)]

    def __init__(self, *, bar_width: int = 8, spark_width: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.bar_width, self.spark_width = bar_width, spark_width
        self.expanded = False
        self.wide = True  # compact rows give each GPU its GiB next to its bar
        self.COLUMNS = COMPACT_COLUMNS
        self._widths = tuple(len(c) for c in self.COLUMNS)
        self._history: dict[str, deque[float]] = {}
        self._shown: tuple[tuple[NodeView, ...], float] = ((), 0.0)
        self.quiet: Quiet = {}

    class Toggled(Message):
        """The table expanded or folded (the dashboard gives it the room and says how to go back)."""

    # ----------------------------------------------------------------- modes
    def set_compact(self, compact: bool) -> None:
        """Narrow terminals get shorter bars and bare GPU levels; rows are rebuilt on the next sample."""
        widths = (6, 6) if compact else (8, 12)
        if widths != (self.bar_width, self.spark_width) or self.wide == compact:
            self.bar_width, self.spark_width = widths
            self.wide = not compact
            self.clear_rows()

    def set_expanded(self, expanded: bool) -> None:
        if expanded == self.expanded:
            return
        self.expanded = expanded
        self.COLUMNS = DETAIL_COLUMNS if expanded else COMPACT_COLUMNS
        self._widths, self._header = tuple(len(c) for c in self.COLUMNS), None
        self.clear_rows()
        self.scroll_to(y=0, animate=False)
        self._redraw()
        self.post_message(self.Toggled())

    def on_focus(self) -> None:
        self.set_expanded(True)

    def on_blur(self) -> None:
        self.set_expanded(False)

    def action_fold(self) -> None:
        self.screen.focus_next()

    # ----------------------------------------------------------------- data
    def show_nodes(self, nodes: tuple[NodeView, ...], now: float, record: bool = True) -> None:
        """Draw a poll's nodes; `record=False` redraws a poll already shown (a resize) without adding it to the
        history again, so the history has one point per poll whatever the number of redraws."""
        keys = set()
        for node in nodes:
            dim = node.state in (HOST_STALE, HOST_UNREACHABLE)
            for g in node.gpus:
                key = f"{node.name}/{g.index}"
                keys.add(key)
                hist = self._history.setdefault(key, deque(maxlen=HISTORY))
                if record and not dim:
                    hist.append(g.mem_used_mib / g.mem_total_mib if g.mem_total_mib else 0.0)
        for key in [k for k in self._history if k not in keys]:
            del self._history[key]
        self._shown = (nodes, now)
        self._redraw()

    def set_quiet(self, quiet: Quiet) -> None:
        """The GPUs whose ranks went quiet, highlighted until they report again."""
        if quiet != self.quiet:
            self.quiet = quiet
            self._redraw()

    def _redraw(self) -> None:
        nodes, now = self._shown
        rows: dict[str, tuple] = {}
        for node in nodes:
            rows.update(self._detail_rows(node, now) if self.expanded else (self._compact_row(node, now),))
        self.set_rows(rows)

    # ----------------------------------------------------------------- cells
    def _state_cell(self, node: NodeView, now: float) -> Text:
        state = node.state
        label = state
        if state == HOST_STALE:
            label = f"stale {fmt.duration(now - node.sampled_at) if node.sampled_at else '?'}"
        elif state == HOST_UNREACHABLE and node.sampled_at:
            label = f"unreachable {fmt.duration(now - node.sampled_at)}"
        return Text(label, style=_STATE_STYLE.get(state, ""))

    def _host_cells(self, node: NodeView) -> tuple[Text, str, str]:
        dim = node.state in (HOST_STALE, HOST_UNREACHABLE)
        ram = f"{fmt.size(node.ram_used)}/{fmt.size(node.ram_total)}" if node.ram_total else "-"
        disk = fmt.size(node.disk_free) if node.disk_total or node.disk_free else "-"
        return Text(node.name, style="bold" + (" dim" if dim else "")), ram, disk

    def _compact_row(self, node: NodeView, now: float) -> tuple[str, tuple]:
        name, ram, disk = self._host_cells(node)
        dim = node.state in (HOST_STALE, HOST_UNREACHABLE)
        quiet = self.quiet.get(node.name, {})
        state = self._state_cell(node, now)
        if quiet:
            state.append(" ")
            state.append(f"{_ranks(quiet.values())} quiet", style=QUIET_STYLE)
        if not node.gpus:
            what = "no GPU" if node.state == HOST_NO_GPU else "?" if node.state == HOST_UNREACHABLE else "-"
            return node.name, (name, Text(what, style="dim"), "-", "", ram, disk, state)
        bars = Text()
        used = total = 0.0
        for i, g in enumerate(node.gpus):
            frac = g.mem_used_mib / g.mem_total_mib if g.mem_total_mib else 0.0
            used, total = used + g.mem_used_mib, total + g.mem_total_mib
            style = QUIET_STYLE if g.index in quiet else "dim" if dim else _mem_style(frac)
            if self.wide:
                if i:
                    bars.append(" ")
                bars.append(level(frac), style=style)
                bars.append(f"{fmt.gib(g.mem_used_mib):<3}", style=style if g.index in quiet else "dim")
            else:
                bars.append(level(frac), style=style)
        utils = [g.util_pct for g in node.gpus if g.util_pct is not None]
        util = f"{sum(utils) / len(utils):.0f}%" if utils else "-"
        mem = Text(f"{fmt.gib(used)}/{fmt.gib(total)}G", style="dim" if dim else "")
        return node.name, (name, bars, mem, util, ram, disk, state)

    def _detail_rows(self, node: NodeView, now: float):
        name, ram, disk = self._host_cells(node)
        state = node.state
        dim = state in (HOST_STALE, HOST_UNREACHABLE)
        state_cell = self._state_cell(node, now)
        if not node.gpus:
            gpu_label = "-" if state != HOST_UNREACHABLE else "?"
            yield f"{node.name}/-", (name, gpu_label, Text("no GPU" if state == HOST_NO_GPU else "-", style="dim"),
                                     "", "", ram, disk, state_cell)
            return
        quiet = self.quiet.get(node.name, {})
        for i, g in enumerate(node.gpus):
            key = f"{node.name}/{g.index}"
            frac = g.mem_used_mib / g.mem_total_mib if g.mem_total_mib else 0.0
            hist = self._history.get(key, ())
            style = "dim" if dim else _mem_style(frac)
            mem = Text.assemble((fmt.bar(frac, self.bar_width), style),
                                (f" {fmt.gib(g.mem_used_mib):>3}/{fmt.gib(g.mem_total_mib)}G", "dim" if dim else ""))
            spark = Text(fmt.spark(list(hist), self.spark_width, top=1.0), style="dim" if dim else "cyan")
            util = "-" if g.util_pct is None else f"{g.util_pct:.0f}%"
            first = i == 0
            cell = state_cell.copy() if first else Text()
            index = Text(str(g.index))
            if g.index in quiet:
                index.stylize(QUIET_STYLE)
                cell.append(" " if first else "")
                cell.append(f"rank {quiet[g.index]} quiet", style=QUIET_STYLE)
            yield key, (name if first else "", index, mem, spark, util,
                        ram if first else "", disk if first else "", cell)
