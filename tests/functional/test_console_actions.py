"""Every key action of the console, driven with Pilot against a REAL run dir and store that the engine made
(tests/functional/real_run.py: a calibrated run whose export worker was SIGKILLed). The tests run in file
order on that one run: look → validate-only → history/detail/note → export-only + cancel → resume."""

from __future__ import annotations

import asyncio
import time

import pytest

from console.api_backend import ApiBackend
from console.factory import build_app
from console.screens.confirm import ConfirmModal
from console.screens.error import ErrorModal
from console.screens.help import HelpScreen
from console.screens.history import HistoryScreen
from console.screens.logs import LogScreen
from console.screens.new_run import NewRunModal
from console.screens.run_detail import RunDetailScreen

pytestmark = pytest.mark.slow  # the session's real run takes ~1 minute to make on two cores

SIZE = (120, 40)


def _app(run):
    return build_app(run.run_id, backend=ApiBackend(run.engine()), use_fleet=False, follow_s=0.3)


async def until(pilot, cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        await pilot.pause(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _stage(app, name):
    return app.run_view.stage(name) if app.run_view else None


def _notes(app) -> list[str]:
    return app.told


async def test_killed_stage_is_shown_and_impossible_actions_are_disabled(real_env):
    app = _app(real_env)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.run_view is not None, what="the run view")
        assert _stage(app, "export").state == "FAILED_WORKER"
        assert _stage(app, "calibrate").state == "SUCCEEDED"
        assert not app.run_view.live
        # a dead run cannot be cancelled; it can be resumed, exported from its amax, validated
        assert app.check_action("cancel", ()) is None
        assert app.check_action("resume", ()) is True
        assert app.check_action("export_only", ()) is True
        assert app.check_action("validate_only", ()) is True
        await pilot.press("c")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, ConfirmModal)
        # the stage table shows the failure; the log tail follows the selected stage
        # the first read of a newly followed stage may come before its lines: wait for both
        await until(pilot, lambda: app.log_stage == "export" and any("export" in line for line in app.log_lines),
                    what="the export log")
        await pilot.press("?")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help closed")
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, LogScreen), what="the log screen")
        assert app.screen.stage == "export"
        await pilot.press("escape")
        # the palette offers the same actions, the impossible ones marked
        cmds = {c.title: c.help for c in app.get_system_commands(app.screen)}
        assert "Resume" in cmds and cmds["Cancel"].startswith("(not possible now)")


async def test_validate_only_reports_and_changes_nothing(real_env):
    app = _app(real_env)
    before = real_env.engine().status(real_env.run_id)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.run_view is not None, what="the run view")
        await pilot.press("v")
        await until(pilot, lambda: app.busy is None and (isinstance(app.screen, ErrorModal) or _notes(app)),
                    timeout=150, what="validate-only's answer")
        shown = (app.screen.text if isinstance(app.screen, ErrorModal) else " ".join(_notes(app)))
        assert "validate-only" in shown
    after = real_env.engine().status(real_env.run_id)
    assert [(s.name, s.state, s.attempt) for s in after.stages] == [(s.name, s.state, s.attempt) for s in before.stages]


async def test_history_filter_detail_and_fix_note(real_env):
    app = _app(real_env)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HistoryScreen) and app.screen.rows, what="history rows")
        hist = app.screen
        assert [r.run_id for r in hist.visible_rows()] == [real_env.run_id]
        await pilot.press("slash", *"nosuchrun")
        await pilot.pause(0.2)
        assert hist.visible_rows() == []
        await pilot.press("escape")  # clears the filter
        await pilot.press("slash", *real_env.run_id[:8], "enter")
        await pilot.pause(0.2)
        assert [r.run_id for r in hist.visible_rows()] == [real_env.run_id]
        await pilot.press("s")  # sort by the next column: the row stays
        assert len(hist.visible_rows()) == 1
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, RunDetailScreen) and app.screen.detail, what="run detail")
        detail = app.screen.detail
        export = [a for a in detail.attempts if a.stage == "export"]
        assert export and export[0].state == "FAILED_WORKER" and export[0].error_class == "killed"
        assert any("amax" in a for a in detail.artifacts)
        await pilot.press("f", *"more-RAM-on-node0", "enter")
        await until(pilot, lambda: any(r.fix_note == "more-RAM-on-node0" for r in real_env.engine().history()),
                    what="the fix note in the store")
        await pilot.press("escape")  # detail → history
        await until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="history again")
        await pilot.press("escape", "escape")  # the first clears the filter, the second leaves
        await until(pilot, lambda: not isinstance(app.screen, (HistoryScreen, RunDetailScreen)), what="dashboard")


async def test_new_run_from_a_bad_recipe_explains_itself(real_env, tmp_path):
    bad = tmp_path / "recipe.toml"
    bad.write_text('[source]\npath = "/nowhere/at/all"\n[target]\nformat = "nvfp5"\n')
    app = _app(real_env)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.run_view is not None, what="the run view")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(app.screen, NewRunModal), what="the recipe prompt")
        app.screen.query_one("Input").value = str(bad)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ErrorModal), what="the recipe error")
        assert "recipe.toml" in app.screen.text and "format" in app.screen.text
        await pilot.press("escape")
        assert app.run_id == real_env.run_id  # still attached to the run it had


async def test_export_only_then_cancel_behind_confirmation(real_env):
    app = _app(real_env)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.run_view is not None, what="the run view")
        await pilot.press("e")
        await until(pilot, lambda: app.run_view.live and app.check_action("cancel", ()) is True, timeout=60,
                    what="export-only to start")
        assert app.check_action("resume", ()) is None  # a live run is not resumed twice
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        await pilot.press("n")  # no: nothing happens
        await pilot.pause(0.5)
        assert app.run_view.live
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), what="the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: not app.run_view.live and any(s.state == "CANCELLED" for s in app.run_view.stages),
                    timeout=30, what="the run to be cancelled")
        assert any("cancel" in n for n in _notes(app))
    view = real_env.engine().status(real_env.run_id)
    assert not view.driver_alive


async def test_resume_after_killed_stage_restarts_it(real_env):
    """`r` hands the run back to the engine: the killed export runs again as a new attempt, and the console
    follows it live (the session's teardown cancels it; the integration tests take resume to the end)."""
    app = _app(real_env)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.run_view is not None, what="the run view")
        before = _stage(app, "export").attempt
        assert app.check_action("resume", ()) is True
        await pilot.press("r")
        await until(pilot, lambda: app.run_view.live and _stage(app, "export").attempt > before
                    and _stage(app, "export").state in ("STARTING", "RUNNING", "SUCCEEDED"), timeout=120,
                    what="the export stage to run again")
        assert any("Resume" in n for n in _notes(app))
        assert app.check_action("cancel", ()) is True and app.check_action("resume", ()) is None
    assert real_env.engine().status(real_env.run_id).driver_alive  # quitting the console left the run running


async def test_empty_state_shown_when_told_before_the_dashboard_mounted(tmp_path):
    """The follow worker can find no run before the dashboard has mounted (CI saw it on loaded cores): the
    answer is kept, and the dashboard shows the empty state when it comes up. The dashboard here waits until
    the worker has answered and the app has had time to handle it, which forces that order."""
    import threading

    from console.screens.dashboard import DashboardScreen
    from engine.api import open_engine

    answered = threading.Event()

    class Backend(ApiBackend):
        def attach_target(self):
            try:
                return super().attach_target()
            finally:
                answered.set()

    class LateDashboard(DashboardScreen):
        async def on_mount(self) -> None:  # runs before DashboardScreen.on_mount (Textual walks the MRO)
            await asyncio.to_thread(answered.wait, 20)
            await asyncio.sleep(0.5)  # the app's message queue handles the answer meanwhile

    app = build_app(backend=Backend(open_engine(str(tmp_path / "work"))), use_fleet=False, follow_s=0.3)
    app.get_default_screen = lambda: LateDashboard(id="dashboard")
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.dashboard is not None, what="the dashboard")
        assert answered.is_set()
        await until(pilot, lambda: "none attached" in str(app.screen.query_one("#stages-box").border_title),
                    timeout=5, what="the empty state")
