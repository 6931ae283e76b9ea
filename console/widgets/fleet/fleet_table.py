"""The fleet table: one row per node × GPU (memory bar, memory history, util), host RAM, disk, state.

A LineTable (not a DataTable): ~35 rows × 8 cells for 4 nodes × 8 GPUs, re-rendered only where a sample changed.
"""

from __future__ import annotations

from collections import deque

from rich.text import Text

from console import format as fmt
from console.models import HOST_CONNECTING, HOST_NO_GPU, HOST_OK, HOST_STALE, HOST_UNREACHABLE, NodeView
from console.widgets.line_table import LineTable

HISTORY = 40
_STATE_STYLE = {HOST_OK: "green", HOST_NO_GPU: "cyan", HOST_STALE: "yellow", HOST_UNREACHABLE: "bold red",
                HOST_CONNECTING: "dim"}


def _mem_style(frac: float) -> str:
    return "red" if frac >= 0.9 else "yellow" if frac >= 0.7 else "green"


class FleetTable(LineTable):
    """Rows are keyed `node/gpu` (or `node/-` without GPUs); a sample re-renders only the rows that changed."""

    COLUMNS = ("node", "gpu", "memory", "history", "util", "RAM", "disk", "state")

    def __init__(self, *, bar_width: int = 8, spark_width: int = 10, **kw) -> None:
        super().__init__(**kw)
        self.bar_width, self.spark_width = bar_width, spark_width
        self._history: dict[str, deque[float]] = {}

    def set_compact(self, compact: bool) -> None:
        """Narrow terminals get shorter bars; rows are rebuilt on the next sample."""
        widths = (6, 6) if compact else (8, 12)
        if widths != (self.bar_width, self.spark_width):
            self.bar_width, self.spark_width = widths
            self.clear_rows()

    def show_nodes(self, nodes: tuple[NodeView, ...], now: float, record: bool = True) -> None:
        """Draw a poll's nodes; `record=False` redraws a poll already shown (a resize) without adding it to the
        history again, so the history has one point per poll whatever the number of redraws."""
        rows: dict[str, tuple] = {}
        for node in nodes:
            rows.update(self._node_rows(node, now, record))
        for key in [k for k in self._history if k not in rows]:
            del self._history[key]
        self.set_rows(rows)

    # ----------------------------------------------------------------- cells
    def _node_rows(self, node: NodeView, now: float, record: bool = True):
        state = node.state
        label = state
        if state == HOST_STALE:
            label = f"stale {fmt.duration(now - node.sampled_at) if node.sampled_at else '?'}"
        elif state == HOST_UNREACHABLE and node.sampled_at:
            label = f"unreachable {fmt.duration(now - node.sampled_at)}"
        dim = state in (HOST_STALE, HOST_UNREACHABLE)
        state_cell = Text(label, style=_STATE_STYLE.get(state, ""))
        ram = f"{fmt.size(node.ram_used)}/{fmt.size(node.ram_total)}" if node.ram_total else "-"
        disk = fmt.size(node.disk_free) if node.disk_total or node.disk_free else "-"
        name = Text(node.name, style="bold" + (" dim" if dim else ""))
        if not node.gpus:
            gpu_label = "-" if state != HOST_UNREACHABLE else "?"
            yield f"{node.name}/-", (name, gpu_label, Text("no GPU" if state == HOST_NO_GPU else "-", style="dim"),
                                     "", "", ram, disk, state_cell)
            return
        for i, g in enumerate(node.gpus):
            key = f"{node.name}/{g.index}"
            frac = g.mem_used_mib / g.mem_total_mib if g.mem_total_mib else 0.0
            hist = self._history.setdefault(key, deque(maxlen=HISTORY))
            if record and not dim:
                hist.append(frac)
            style = "dim" if dim else _mem_style(frac)
            mem = Text.assemble((fmt.bar(frac, self.bar_width), style),
                                (f" {fmt.gib(g.mem_used_mib):>3}/{fmt.gib(g.mem_total_mib)}G", "dim" if dim else ""))
            spark = Text(fmt.spark(list(hist), self.spark_width, top=1.0), style="dim" if dim else "cyan")
            util = "-" if g.util_pct is None else f"{g.util_pct:.0f}%"
            first = i == 0
            yield key, (name if first else "", str(g.index), mem, spark, util,
                        ram if first else "", disk if first else "", state_cell if first else "")
