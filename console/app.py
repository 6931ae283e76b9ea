"""The quantdeck console: compose, message handlers and workers (nothing else).

A view over run dirs, the store and telemetry. Runs are other processes: quitting never stops one, and
opening again re-attaches. Blocking reads happen in thread workers that post messages; only handlers on
the event loop touch widgets.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.screen import ModalScreen, Screen
from textual.worker import Worker, WorkerState, get_current_worker

from console.actions import ACTIONS
from console.backend import Backend
from console.fleet import FleetFeed
from console.keymap import KeyBinding, default_keymap
from console.messages import (
    ActionFailed,
    ActionFinished,
    FleetSampled,
    HistoryLoaded,
    LogLinesRead,
    RunDetailLoaded,
    RunRead,
)
from console.models import NodeView
from console.screens.confirm import ConfirmModal
from console.screens.dashboard import DashboardScreen
from console.screens.error import ErrorModal
from console.screens.help import HelpScreen
from console.screens.history import HistoryScreen
from console.screens.logs import LogScreen
from console.screens.new_run import NewRunModal
from console.screens.run_detail import RunDetailScreen
from engine.api import RunView
from engine.core.names import StageState

RUN_ACTIONS = ("resume", "export_only", "validate_only", "cancel", "logs")
_FAILED = (StageState.FAILED, StageState.FAILED_WORKER)


def _resume_gc() -> None:
    gc.freeze()  # what start-up made lives as long as the app: later collections skip it
    gc.enable()


def _gates(run: RunView) -> tuple:
    """What check_action looks at: bindings are refreshed only when this changes."""
    return run.id, run.live, run.all_done, run.has_amax, bool(run.stages)


class QuantdeckApp(App):
    CSS_PATH = "styles/app.tcss"
    TITLE = "quantdeck"

    def __init__(self, backend: Backend, fleet: FleetFeed | None, run_id: str | None = None, *,
                 clock: Callable[[], float] = time.time, follow_s: float = 0.5,
                 keymap: Iterable[KeyBinding] | None = None, recipe_hint: str = "") -> None:
        super().__init__()
        self.backend, self.fleet, self.run_id = backend, fleet, run_id
        self.clock, self.follow_s, self.recipe_hint = clock, follow_s, recipe_hint
        self.run_view: RunView | None = None
        self.nothing_attached = False  # the follow worker found no run: the dashboard shows its empty state
        self.nodes: tuple[NodeView, ...] = ()
        self.told: list[str] = []  # every notification given, in order (tests and the tmux capture read it)
        self.log_stage: str | None = None
        self.log_lines: list[str] = []  # the tail shown, kept here so a dashboard composed later can show it
        self.busy: str | None = None  # an action handed to the engine and not yet answered
        self.followed_stage: str | None = None  # chosen on the UI thread, read by the follow worker
        self.keys = {kb.action: kb.key for kb in (keymap or default_keymap())}
        self._wake = threading.Event()
        self._stop = threading.Event()
        for action, key in self.keys.items():
            a = ACTIONS[action]
            self.bind(key, action, description=a.label, show=a.show,
                      key_display="?" if key == "question_mark" else None)

    # ----------------------------------------------------------------- lifecycle
    def get_default_screen(self) -> Screen:
        return DashboardScreen(id="dashboard")

    def on_mount(self) -> None:
        if not gc.isenabled():  # paused by `quantdeck console` for start-up: back on once the first frames are out
            self.set_timer(2.0, _resume_gc)
        self.sub_title = self._sub_title()
        if self.fleet is not None:
            self.poll_fleet()
        self.attach(self.run_id)

    def on_unmount(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.fleet is not None:  # telemetry threads end in the background: quitting never waits on a node
            threading.Thread(target=self.fleet.close, name="fleet-close", daemon=True).start()

    @property
    def dashboard(self) -> DashboardScreen | None:
        """The dashboard once its widgets exist (a message may arrive before it composed)."""
        dash = self.screen_stack[0] if self.screen_stack else None
        return dash if isinstance(dash, DashboardScreen) and dash.composed else None

    def _sub_title(self) -> str:
        rid = self.run_id or "no run"
        return f"{rid} · {time.strftime('%H:%M:%S', time.gmtime(self.clock()))} UTC"

    def attach(self, run_id: str | None) -> None:
        """Follow `run_id` (None: the live or latest run, found by a worker)."""
        self.run_id = run_id
        self.run_view = None
        self.nothing_attached = False
        self.followed_stage = None
        self.follow_run(run_id)

    def follow_stage(self, stage: str) -> None:
        if stage != self.followed_stage:
            self.followed_stage = stage
            self._wake.set()

    # ----------------------------------------------------------------- workers
    @work(thread=True, exclusive=True, group="fleet", exit_on_error=False)
    def poll_fleet(self) -> None:
        worker = get_current_worker()
        assert self.fleet is not None
        while not worker.is_cancelled and not self._stop.is_set():
            t0 = time.monotonic()
            try:
                nodes = self.fleet.poll()
            except Exception as e:  # noqa: BLE001 - telemetry trouble is shown, never fatal
                nodes = ()
                self.post_message(ActionFailed("telemetry", "telemetry failed", str(e)))
            self.post_message(FleetSampled(tuple(nodes)))
            self._stop.wait(max(self.fleet.interval_s - (time.monotonic() - t0), 0.05))

    @work(thread=True, exclusive=True, group="follow", exit_on_error=False)
    def follow_run(self, run_id: str | None) -> None:
        from engine.core.errors import QuantdeckError

        worker = get_current_worker()
        if run_id is None:
            run_id = self.backend.attach_target()
            if run_id is None:
                self.post_message(ActionFailed("attach", "", ""))  # nothing to attach to: show the empty state
                return
            self.call_from_thread(setattr, self, "run_id", run_id)
        offsets: dict[str, int] = {}
        shown: str | None = None
        last: RunView | None = None
        while not worker.is_cancelled and not self._stop.is_set():
            try:
                view = self.backend.read_run(run_id)
            except QuantdeckError as e:
                self.post_message(ActionFailed("follow", e.title, e.one_line()))
                self._stop.wait(2.0)
                continue
            if view != last:  # an unchanged run posts nothing: the UI thread only hears about changes
                self.post_message(RunRead(view))
                last = view
            stage = self.followed_stage or (view.current.name if view.current else None)
            if stage:
                start = offsets.get(stage, 0) if stage == shown else 0  # a stage shown anew is read whole
                lines, offsets[stage] = self.backend.read_log(run_id, stage, start)
                if lines or stage != shown:
                    self.post_message(LogLinesRead(stage, lines, reset=stage != shown))
                    shown = stage
            self._wake.wait(self.follow_s)
            self._wake.clear()

    @work(thread=True, exclusive=True, group="action", exit_on_error=False)
    def engine_action(self, action: str, arg: str) -> None:
        from engine.core.errors import QuantdeckError

        fn = {"resume": self.backend.resume, "export_only": self.backend.export_only,
              "validate_only": self.backend.validate_only, "cancel": self.backend.cancel,
              "new_run": self.backend.start}[action]
        try:
            result = fn(arg)
        except QuantdeckError as e:
            self.post_message(ActionFailed(action, e.title, e.one_line(), e.hint or ""))
            return
        run_id = result if action == "new_run" else arg
        text = result if action in ("validate_only", "cancel") else f"{ACTIONS[action].label}: {run_id}"
        self.post_message(ActionFinished(action, run_id, text))

    @work(thread=True, exclusive=True, group="history", exit_on_error=False)
    def load_history(self) -> None:
        self.post_message(HistoryLoaded(self.backend.history()))

    @work(thread=True, exclusive=True, group="detail", exit_on_error=False)
    def load_detail(self, run_id: str) -> None:
        self.post_message(RunDetailLoaded(self.backend.detail(run_id)))

    @work(thread=True, exclusive=True, group="note", exit_on_error=False)
    def save_note_worker(self, run_id: str, text: str) -> None:
        self.backend.set_note(run_id, text)
        self.post_message(RunDetailLoaded(self.backend.detail(run_id)))
        self.post_message(HistoryLoaded(self.backend.history()))

    @work(thread=True, exclusive=True, group="logs", exit_on_error=False)
    def load_full_log(self, run_id: str, stage: str) -> None:
        lines, _ = self.backend.read_log(run_id, stage, 0)
        self.call_from_thread(self.push_screen, LogScreen(run_id, stage, lines))

    # ----------------------------------------------------------------- handlers
    def on_fleet_sampled(self, msg: FleetSampled) -> None:
        self.nodes = msg.nodes
        self.sub_title = self._sub_title()
        if self.dashboard:
            with self.batch_update():
                self.dashboard.show_fleet(msg.nodes, self.clock())

    def on_run_read(self, msg: RunRead) -> None:
        prev, run = self.run_view, msg.run
        self.run_view = run
        if run.id != self.run_id:
            return
        self.sub_title = self._sub_title()
        if self.dashboard:
            with self.batch_update():
                self.dashboard.show_run(run)
        if prev is not None and prev.id == run.id:
            self._notify_transitions(prev, run)
        if prev is None or _gates(prev) != _gates(run):
            self.refresh_bindings()

    def _notify_transitions(self, prev: RunView, run: RunView) -> None:
        before = {s.name: s.state for s in prev.stages}
        for s in run.stages:
            if s.state in _FAILED and before.get(s.name) not in _FAILED:
                what = f"{s.error_class}: {s.error}" if s.error_class else (s.error or s.state.lower())
                self.notify(f"stage {s.name} failed — {what}", title="stage failed", severity="error", timeout=10)
            if s.state == StageState.CANCELLED and before.get(s.name) != StageState.CANCELLED:
                self.notify(f"stage {s.name} cancelled", severity="warning")
        if run.all_done and not prev.all_done:
            self.notify(f"run {run.id} finished", title="run finished", timeout=10)

    def on_log_lines_read(self, msg: LogLinesRead) -> None:
        if msg.reset or msg.stage != self.log_stage:
            self.log_stage, self.log_lines = msg.stage, []
        self.log_lines = (self.log_lines + msg.lines)[-500:]
        if self.dashboard:
            self.dashboard.show_log(msg.stage, msg.lines, msg.reset)
        top = self.screen_stack[-1] if self.screen_stack else None  # a read can land before the first screen
        if isinstance(top, LogScreen):
            top.append(msg.stage, msg.lines)

    def on_history_loaded(self, msg: HistoryLoaded) -> None:
        for s in self.screen_stack:
            if isinstance(s, HistoryScreen):
                s.show_rows(msg.rows)

    def on_run_detail_loaded(self, msg: RunDetailLoaded) -> None:
        for s in self.screen_stack:
            if isinstance(s, RunDetailScreen) and s.run_id == msg.detail.row.run_id:
                s.show_detail(msg.detail)

    def on_action_finished(self, msg: ActionFinished) -> None:
        self.busy = None
        self.notify(msg.text, title="handed to the engine")
        if msg.run_id != self.run_id or msg.action == "new_run":
            self.attach(msg.run_id)
        else:
            self._wake.set()
        self.refresh_bindings()

    def on_action_failed(self, msg: ActionFailed) -> None:
        if msg.action == "attach":
            # kept on the app too: the worker can answer before the dashboard has mounted (a race CI saw)
            self.nothing_attached = True
            if self.dashboard:
                self.dashboard.show_run(None)
            return
        if msg.action in ("follow", "telemetry"):
            if self.dashboard:
                self.dashboard.show_status(f"{msg.title}: {msg.text}", style="yellow")
            return
        self.busy = None
        self.refresh_bindings()
        self.push_screen(ErrorModal(msg.title, msg.text, ""))

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place a worker's unexpected failure is shown (a bug, or a store/run dir we cannot read)."""
        if event.state == WorkerState.ERROR:
            err = event.worker.error
            from engine.core.errors import QuantdeckError

            self.busy = None
            if isinstance(err, QuantdeckError):
                self.push_screen(ErrorModal(err.title, err.one_line()))
            else:
                self.push_screen(ErrorModal(f"{event.worker.name} failed", f"{type(err).__name__}: {err}"))

    def notify(self, message: str, *, title: str = "", severity: str = "information", timeout: float | None = None,
               markup: bool = True) -> None:
        self.told.append(f"{title}: {message}" if title else message)
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- actions
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """False hides a binding (under a modal); None shows it greyed out: not possible now."""
        if action not in ACTIONS:
            return True
        if not self.screen_stack or isinstance(self.screen, ModalScreen):
            return False
        if action not in RUN_ACTIONS:
            return True
        run = self.run_view
        if run is None or (self.busy and action != "logs"):
            return None
        ok = {
            "cancel": run.live,
            "resume": not run.live and not run.all_done,
            "export_only": not run.live and run.has_amax,
            "validate_only": not run.live,
            "logs": bool(run.stages),
        }[action]
        return True if ok else None

    def _start(self, action: str) -> None:
        if self.run_view is None or self.check_action(action, ()) is not True:
            return
        self.busy = action
        self.refresh_bindings()
        self.engine_action(action, self.run_view.id)

    def action_resume(self) -> None:
        self._start("resume")

    def action_export_only(self) -> None:
        self._start("export_only")

    def action_validate_only(self) -> None:
        self._start("validate_only")

    def action_cancel(self) -> None:
        if self.run_view is None or self.check_action("cancel", ()) is not True:
            return
        run_id = self.run_view.id
        stage = self.run_view.current.name if self.run_view.current else "the run"

        def answered(yes: bool | None) -> None:
            if yes:
                self._start("cancel")
            else:
                self.notify("cancel: nothing done")

        self.push_screen(ConfirmModal(f"Cancel run {run_id}?\nThe running stage ({stage}) is stopped; "
                                      "finished units are kept and `r` resumes later.", yes="Cancel run"), answered)

    def action_new_run(self) -> None:
        def answered(path: str | None) -> None:
            if path:
                self.busy = "new_run"
                self.engine_action("new_run", path)

        self.push_screen(NewRunModal(self.recipe_hint), answered)

    def action_history(self) -> None:
        if isinstance(self.screen, HistoryScreen):
            self.pop_screen()
            return
        self.push_screen(HistoryScreen())
        self.load_history()

    def open_run_detail(self, run_id: str) -> None:
        self.push_screen(RunDetailScreen(run_id))
        self.load_detail(run_id)

    def save_note(self, run_id: str, text: str) -> None:
        self.save_note_worker(run_id, text)
        self.notify(f"fix note saved for {run_id}")

    def action_logs(self) -> None:
        if isinstance(self.screen, LogScreen):
            self.pop_screen()
            return
        if self.run_view is None:
            return
        stage = self.followed_stage or (self.run_view.current.name if self.run_view.current else None)
        if stage:
            self.load_full_log(self.run_view.id, stage)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.keys))

    async def action_quit(self) -> None:
        """Leaves the run alone: it is another process; `quantdeck console` re-attaches."""
        self.exit()

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette offers the same actions as the keys; impossible ones say so and do nothing."""
        for a in ACTIONS.values():
            if a.name == "quit":
                continue
            ok = self.check_action(a.name, ())
            help_ = a.help if ok else f"(not possible now) {a.help}"
            yield SystemCommand(a.label if a.name != "export_only" else "Export-only", help_,
                                getattr(self, f"action_{a.name}"))
        yield from super().get_system_commands(screen)
