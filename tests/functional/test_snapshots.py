"""Snapshots of the dashboard (4 nodes × 8 GPUs replayed from real nvidia-smi output: one node stale, and one
without GPUs or with 8 like the others), with the fleet folded (one row per node) and open (one row per GPU), of a
run whose eval stalled, and of every other screen, at a fixed clock, built through the console's factory."""

from __future__ import annotations

from static_backend import StaticBackend, stalled_run

from console.factory import build_app
from console.fleet import replay_fleet_4x8
from console.messages import FleetSampled
from console.screens.error import ErrorModal


def _app(clock, run=None):
    return build_app(backend=StaticBackend(run=run), use_fleet=False, clock=clock, follow_s=60)

def _feed(app, clock, polls: int = 12, cpu_node: bool = True, keys: tuple[str, ...] = ()):
    feed = replay_fleet_4x8(clock=clock, start=False, cpu_node=cpu_node)

    async def run_before(pilot):
        # the polls go to a dashboard that exists: one posted before it mounted would be handled and not drawn
        # (it draws only the newest on mount), and how many that are depends on timing, not on the app
        while app.dashboard is None or app.run_view is None:
            await pilot.pause(0.02)
        for _ in range(polls):
            feed.source.advance()
            app.post_message(FleetSampled(feed.poll()))
        await pilot.pause(0.3)
        for key in keys:
            await pilot.press(key)
            await pilot.pause(0.1)
        await pilot.pause(0.2)
        await pilot.wait_for_scheduled_animations()
        await pilot.pause(0.2)  # a second layout pass settles widths that depend on the first (the rank line)

    return run_before

def test_dashboard_120x40(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(120, 40), run_before=_feed(app, fixed_clock))

def test_dashboard_80x24(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_feed(app, fixed_clock))

def test_dashboard_4x8_stalled_80x24(snap_compare, fixed_clock):
    """32 GPUs in four rows, the stalled eval row in view, node1's GPUs 3 and 4 (ranks 11, 12) highlighted."""
    app = _app(fixed_clock, stalled_run())
    assert snap_compare(app, terminal_size=(80, 24), run_before=_feed(app, fixed_clock, cpu_node=False))

def test_dashboard_4x8_stalled_160x50(snap_compare, fixed_clock):
    app = _app(fixed_clock, stalled_run())
    assert snap_compare(app, terminal_size=(160, 50), run_before=_feed(app, fixed_clock, cpu_node=False))

def test_dashboard_4x8_fleet_open_80x24(snap_compare, fixed_clock):
    app = _app(fixed_clock, stalled_run())
    assert snap_compare(app, terminal_size=(80, 24),
                        run_before=_feed(app, fixed_clock, cpu_node=False, keys=("tab", "pagedown")))

def test_dashboard_4x8_fleet_open_160x50(snap_compare, fixed_clock):
    app = _app(fixed_clock, stalled_run())
    assert snap_compare(app, terminal_size=(160, 50), run_before=_feed(app, fixed_clock, cpu_node=False,
                                                                       keys=("tab",)))

def _then(app, clock, *keys: str, act=None):
    feed = _feed(app, clock, polls=1)

    async def run_before(pilot):
        await feed(pilot)
        if act is not None:
            act(app)
        for key in keys:
            await pilot.press(key)
            await pilot.pause(0.2)
        await pilot.pause(0.3)
        await pilot.pause(0.2)

    return run_before

def test_history_screen(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(120, 30), run_before=_then(app, fixed_clock, "h"))

def test_run_detail_screen(snap_compare, fixed_clock):
    """A finished run: its validate and eval figures over its attempts."""
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(100, 30),
                        run_before=_then(app, fixed_clock, act=lambda a: a.open_run_detail("r-20251120-0930-5e4f")))

def test_run_detail_screen_80x24_without_figures(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(80, 24),
                        run_before=_then(app, fixed_clock, act=lambda a: a.open_run_detail("r-20251121-2210-9c8d")))

def test_log_screen(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(100, 24), run_before=_then(app, fixed_clock, "l"))

def test_help_screen(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(100, 30), run_before=_then(app, fixed_clock, "question_mark"))

def test_confirm_cancel_modal(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_then(app, fixed_clock, "c"))

def test_new_run_modal(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_then(app, fixed_clock, "n"))

def test_error_modal(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    err = ErrorModal("CUDA out of memory", "stage calibrate failed on node2: tried to allocate 7.00 GiB on cuda:3",
                     "fewer ranks per node, or [calibrate] batch_size = 2")
    assert snap_compare(app, terminal_size=(80, 24), run_before=_then(app, fixed_clock,
                                                                      act=lambda a: a.push_screen(err)))
