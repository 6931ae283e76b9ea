"""The dashboard: fleet on top, the run's stages with calibration detail, and the log tail of a stage."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Header, Static

from console.format import rank_line
from console.models import NodeView, RunView
from console.widgets import CalibPanel, FleetTable, KeyBar, LogTail, StageTable


class DashboardScreen(Screen):
    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with Vertical(id="fleet-box") as box:
            box.border_title = "fleet"
            yield FleetTable(id="fleet")
        with Horizontal(id="run-box"):
            with Vertical(id="stages-box") as stages:
                stages.border_title = "run"
                yield StageTable(id="stages")
            with Vertical(id="calib-box") as calib:
                calib.border_title = "calibration"
                yield CalibPanel(id="calib")
        yield LogTail(id="log")
        yield Static("", id="status-line")
        yield KeyBar()

    ready = False

    @property
    def composed(self) -> bool:
        """Mounted and not torn down: a read that lands while the app closes finds no widgets to show it in
        (CI saw a log read arrive after the dashboard's widgets were gone)."""
        return self.ready and bool(self.query(LogTail))

    def on_mount(self) -> None:
        self.query_one(LogTail).border_title = "log"
        self.query_one("#status-line").display = False
        self.ready = True
        app = self.app
        if getattr(app, "nodes", None):
            self.show_fleet(app.nodes, app.clock())  # type: ignore[attr-defined]
        if getattr(app, "run_view", None) is not None:
            self.show_run(app.run_view)  # type: ignore[attr-defined]
        elif getattr(app, "nothing_attached", False):  # told before this screen existed
            self.show_run(None)
        if getattr(app, "log_stage", None):
            self.show_log(app.log_stage, app.log_lines, True)  # type: ignore[attr-defined]
        self.query_one(StageTable).focus()

    def on_resize(self, event) -> None:
        narrow = self.size.width < 110 or self.size.height < 30
        self.set_class(narrow, "narrow")
        self.query_one(FleetTable).set_compact(self.size.width < 110)
        # the poll already shown, redrawn at the new width: not a new point of its history
        if self.app.nodes:  # type: ignore[attr-defined]
            self.show_fleet(self.app.nodes, self.app.clock(), record=False)  # type: ignore[attr-defined]

    def show_fleet(self, nodes: tuple[NodeView, ...], now: float, record: bool = True) -> None:
        self.query_one(FleetTable).show_nodes(nodes, now, record)
        box = self.query_one("#fleet-box")
        gpus = sum(len(n.gpus) for n in nodes)
        bad = sum(1 for n in nodes if n.state in ("stale", "unreachable"))
        box.border_title = f"fleet · {len(nodes)} nodes · {gpus} GPUs" + (f" · {bad} not answering" if bad else "")

    def show_run(self, run: RunView | None) -> None:
        box = self.query_one("#stages-box")
        if run is None:
            box.border_title = "run · none attached (n: new run, h: history)"
            self.query_one(CalibPanel).show_calib(None)
            return
        box.border_title = f"run {run.run_id} · {run.state.lower()}" + (" · live" if run.live else "")
        cur = run.current  # a running distributed stage: each rank's share under the stages (calibrate's: right)
        ranks = rank_line(cur.rank_parts, cur.ranks, width=max(box.size.width - 8 - len(cur.name), 20)) \
            if cur is not None and cur.state == "RUNNING" and cur.name != "calibrate" else ""
        box.border_subtitle = f"{cur.name} {ranks}" if ranks else " ".join(x for x in (run.model, run.target) if x)
        self.query_one(StageTable).show_run(run)
        cal = run.stage("calibrate")
        self.query_one(CalibPanel).show_calib(run.calib, cal.state if cal else "")

    def show_log(self, stage: str, lines: list[str], reset: bool) -> None:
        self.query_one(LogTail).show_lines(stage, lines, reset)

    def show_status(self, text: str, style: str = "dim") -> None:
        line = self.query_one("#status-line", Static)
        line.update(Text(text, style=style))
        line.display = bool(text)

    @property
    def selected_stage(self) -> str | None:
        return self.query_one(StageTable).selected_stage

    def on_stage_table_highlighted(self, event: StageTable.Highlighted) -> None:
        self.app.follow_stage(event.stage)  # type: ignore[attr-defined]
