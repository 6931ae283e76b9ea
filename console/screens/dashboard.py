"""The dashboard: the fleet on top (one row per node; per GPU while it has the focus), the run's stages with
calibration detail and quality figures, and the log tail of a stage. A stalled stage's quiet ranks are marked on
the fleet's GPUs and in the run's title."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Header, Static

from console import format as fmt
from console.format import rank_line
from console.models import HOST_STALE, HOST_UNREACHABLE, NodeView
from console.widgets import CalibPanel, FleetTable, KeyBar, LogTail, QualityPanel, StageTable
from console.widgets.fleet.fleet_table import Quiet
from engine.api import QualityView, RunView
from engine.core.names import StageName, StageState


def quiet_gpus(run: RunView | None) -> Quiet:
    """node → {GPU index: rank} of the ranks a stalled stage waits on. A node's ranks take its GPUs in rank order
    (torchrun's local ranks); a stage of one rank runs on GPU 0 of its host."""
    out: Quiet = {}
    for s in run.stages if run is not None else ():
        if not (s.stalled and s.quiet_ranks):
            continue
        host_of = {r: h for r, h, _d, _t in s.rank_parts}
        if not host_of and len(set(s.hosts)) == 1:
            host_of = {r: s.hosts[0] for r in s.quiet_rank_ids}
        for r in s.quiet_rank_ids:
            host = host_of.get(r)
            if host:
                local = sorted(q for q, h in host_of.items() if h == host).index(r)
                out.setdefault(host, {})[local] = r
    return out


def stall_note(run: RunView) -> str:
    """" · calibrate stalled 15m00s r3,17 quiet" (highlighted) for a stalled stage ("" otherwise)."""
    for s in run.stages:
        if s.stalled:
            who = f" r{','.join(map(str, s.quiet_rank_ids))} quiet" if s.ranks and s.quiet_ranks else ""
            return f" · [b black on yellow]{s.name} stalled {fmt.duration(s.silent_s)}{who}[/]"
    return ""


class DashboardScreen(Screen):
    BINDINGS = [Binding("tab", "toggle_fleet", "Fleet", show=False)]

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with Vertical(id="fleet-box") as box:
            box.border_title = "fleet"
            yield FleetTable(id="fleet")
        with Horizontal(id="run-box"):
            with Vertical(id="stages-box") as stages:
                stages.border_title = "run"
                yield StageTable(id="stages")
            with Container(id="side-box"):
                with Vertical(id="calib-box") as calib:
                    calib.border_title = "calibration"
                    yield CalibPanel(id="calib")
                with Vertical(id="quality-box") as quality:
                    quality.border_title = "quality"
                    yield QualityPanel(id="quality")
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
        self.set_class(self.size.height < 30, "short")
        self.query_one(FleetTable).set_compact(self.size.width < 110)
        # the poll already shown, redrawn at the new width: not a new point of its history
        if self.app.nodes:  # type: ignore[attr-defined]
            self.show_fleet(self.app.nodes, self.app.clock(), record=False)  # type: ignore[attr-defined]

    def show_fleet(self, nodes: tuple[NodeView, ...], now: float, record: bool = True) -> None:
        self.query_one(FleetTable).show_nodes(nodes, now, record)
        self._fleet_title(nodes)

    def _fleet_title(self, nodes: tuple[NodeView, ...]) -> None:
        table = self.query_one(FleetTable)
        gpus = sum(len(n.gpus) for n in nodes)
        bad = sum(1 for n in nodes if n.state in (HOST_STALE, HOST_UNREACHABLE))
        hint = "esc: fold" if table.expanded else "tab: per GPU" if gpus else ""
        self.query_one("#fleet-box").border_title = " · ".join(
            x for x in ("fleet", fmt.plural(len(nodes), "node"), fmt.plural(gpus, "GPU"),
                        f"{bad} not answering" if bad else "", f"[dim]{hint}[/]" if hint else "") if x)

    def on_fleet_table_toggled(self, event: FleetTable.Toggled) -> None:
        self.set_class(self.query_one(FleetTable).expanded, "fleet-open")
        self._fleet_title(self.app.nodes)  # type: ignore[attr-defined]

    def action_toggle_fleet(self) -> None:
        """Tab: the fleet per GPU, and back to the stages."""
        if self.focused is self.query_one(FleetTable):
            self.query_one(StageTable).focus()
        else:
            self.query_one(FleetTable).focus()

    def show_run(self, run: RunView | None) -> None:
        box = self.query_one("#stages-box")
        if run is None:
            box.border_title = "run · none attached (n: new run, h: history)"
            self.query_one(CalibPanel).show_calib(None)
            self.query_one(QualityPanel).show_quality(None)
            self.query_one(FleetTable).set_quiet({})
            return
        box.border_title = f"run {run.id} · {run.result.lower()}" + (" · live" if run.live else "") \
            + stall_note(run)
        self.query_one(FleetTable).set_quiet(quiet_gpus(run))
        self.query_one(QualityPanel).show_quality(run.quality or QualityView(
            validate_state=v.state if (v := run.stage(StageName.VALIDATE)) else "",
            eval_state=e.state if (e := run.stage(StageName.EVAL)) else ""))
        self._set_rank_subtitle(run)
        # the box's width is known only once laid out: a run shown before that is fitted again after the refresh
        self.call_after_refresh(lambda: self._set_rank_subtitle(run))
        table = self.query_one(StageTable)
        table.show_run(run)
        # a plan shown before the table had its size left the cursor's row (the running stage) unscrolled to
        self.call_after_refresh(lambda: table.scroll_to_row(table.cursor))
        cal = run.stage(StageName.CALIBRATE)
        self.query_one(CalibPanel).show_calib(run.calib, cal.state if cal else "")

    def _set_rank_subtitle(self, run: RunView) -> None:
        """Under the stages: each rank's share of a running distributed stage (calibrate's is on the right)."""
        box = self.query_one("#stages-box")
        cur = run.current
        ranks = rank_line(cur.rank_parts, cur.ranks, width=max(box.size.width - 8 - len(cur.name), 20)) \
            if cur is not None and cur.state == StageState.RUNNING and cur.name != StageName.CALIBRATE else ""
        box.border_subtitle = f"{cur.name} {ranks}" if ranks else " ".join(x for x in (run.model, run.target) if x)

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
