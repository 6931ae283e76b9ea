"""Live behaviour with a deterministic backend: notifications on a failed stage and a finished run, cells
updated in place, and a telemetry poll that hangs (a dead node) never freezing the screen."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

from static_backend import StaticBackend, snapshot_run

from console.factory import build_app
from console.models import NodeView
from console.screens.help import HelpScreen
from console.widgets import FleetTable, StageTable


async def _until(pilot, cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await pilot.pause(0.05)
    raise AssertionError("timed out")


async def test_failed_stage_and_finished_run_are_notified(fixed_clock):
    backend = StaticBackend()
    app = build_app(backend=backend, use_fleet=False, clock=fixed_clock, follow_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        # the first run read can come before the dashboard is mounted (then no row is drawn yet): wait for the rows
        await _until(pilot, lambda: app.run_view is not None and app.dashboard is not None
                     and app.dashboard.query_one(StageTable).row_count == len(backend.run.stages))
        table = app.dashboard.query_one(StageTable)
        rows_before = table.row_count
        st = list(backend.run.stages)
        st[2] = replace(st[2], state="FAILED", error_class="cuda-oom", error="CUDA out of memory")
        backend.run = replace(backend.run, stages=tuple(st), driver_alive=False, result="FAILED")
        await _until(pilot, lambda: any("calibrate failed" in t for t in app.told))
        assert any("cuda-oom" in t for t in app.told)
        assert table.row_count == rows_before  # updated in place, not rebuilt
        assert app.check_action("resume", ()) is True and app.check_action("cancel", ()) is None
        done = tuple(replace(s, state="SUCCEEDED") for s in backend.run.stages)
        backend.run = replace(backend.run, stages=done, result="SUCCEEDED")
        await _until(pilot, lambda: any("finished" in t for t in app.told))
        assert app.check_action("resume", ()) is None  # nothing left to resume


class HangingFleet:
    """A fleet whose poll blocks like a node that stopped answering (until released)."""

    interval_s = 0.05

    def __init__(self):
        self.release = threading.Event()
        self.calls = 0

    def poll(self):
        self.calls += 1
        if self.calls > 1:
            self.release.wait(30)
        return (NodeView("node0", "10.0.0.1", "no GPU", 0.0),)

    def close(self):
        self.release.set()


async def test_a_hanging_telemetry_poll_never_freezes_the_screen(fixed_clock):
    fleet = HangingFleet()
    app = build_app(backend=StaticBackend(run=snapshot_run()), fleet=fleet, clock=fixed_clock, follow_s=0.05)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await _until(pilot, lambda: fleet.calls >= 2)  # the poll thread is now stuck
            await pilot.press("question_mark")  # answered while the poll thread is stuck
            await _until(pilot, lambda: isinstance(app.screen, HelpScreen), timeout=10.0)
            assert app.screen_stack[0].query_one(FleetTable).row_count == 1
            await pilot.press("escape")
    finally:
        fleet.release.set()


async def test_key_line_shows_impossible_keys_greyed_and_a_click_presses_a_key(fixed_clock):
    from console.screens.history import HistoryScreen
    from console.widgets import KeyBar

    app = build_app(backend=StaticBackend(), use_fleet=False, clock=fixed_clock, follow_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: app.run_view is not None)
        bar = app.screen.query_one(KeyBar)
        await pilot.pause(0.1)
        hits = {key: (start, enabled) for start, _end, key, enabled in bar._hits}
        assert hits["r"][1] is False and hits["h"][1] is True  # a live run: resume greyed, history not
        assert "Quit" in str(bar.render())
        await pilot.click(KeyBar, offset=(hits["r"][0] + 1, 0))  # a greyed key does nothing
        await pilot.pause(0.1)
        assert not isinstance(app.screen, HistoryScreen) and not app.busy
        await pilot.click(KeyBar, offset=(hits["h"][0] + 1, 0))
        await _until(pilot, lambda: isinstance(app.screen, HistoryScreen))


async def test_a_read_that_lands_while_the_dashboard_is_torn_down_is_dropped(fixed_clock):
    """The follow worker can post a log read after the closing app removed the dashboard's widgets (CI saw
    NoMatches for LogTail): the read is kept on the app and nothing is drawn."""
    from console.messages import LogLinesRead
    from console.widgets import LogTail

    app = build_app(backend=StaticBackend(), use_fleet=False, clock=fixed_clock, follow_s=0.05)
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: app.dashboard is not None)
        dash = app.dashboard
        await dash.query_one(LogTail).remove()
        assert app.dashboard is None
        app.post_message(LogLinesRead("calibrate", ["late line"], reset=True))
        await pilot.pause(0.5)
        assert "late line" in app.log_lines or app.log_stage != "calibrate"  # kept on the app (or a newer read)
        assert app.return_code is None and app.screen is dash  # no crash, no error screen
