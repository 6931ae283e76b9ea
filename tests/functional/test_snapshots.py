"""Snapshots of the dashboard (4 nodes × 8 GPUs replayed from real nvidia-smi output, one node stale, one
without GPUs) and of the history screen, at a fixed clock, built through the console's factory."""

from __future__ import annotations

from static_backend import StaticBackend

from console.factory import build_app
from console.fleet import replay_fleet_4x8
from console.messages import FleetSampled


def _app(clock):
    return build_app(backend=StaticBackend(), use_fleet=False, clock=clock, follow_s=60)


def _feed(app, clock, polls: int = 12):
    feed = replay_fleet_4x8(clock=clock, start=False)

    async def run_before(pilot):
        # the polls go to a dashboard that exists: one posted before it mounted would be handled and not drawn
        # (it draws only the newest on mount), and how many that are depends on timing, not on the app
        while app.dashboard is None:
            await pilot.pause(0.02)
        for _ in range(polls):
            feed.source.advance()
            app.post_message(FleetSampled(feed.poll()))
        await pilot.pause(0.3)
        await pilot.pause(0.2)

    return run_before


def test_dashboard_120x40(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(120, 40), run_before=_feed(app, fixed_clock))


def test_dashboard_80x24(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_feed(app, fixed_clock))


def test_history_screen(snap_compare, fixed_clock):
    app = _app(fixed_clock)
    feed = _feed(app, fixed_clock, polls=1)

    async def run_before(pilot):
        await feed(pilot)
        await pilot.press("h")
        await pilot.pause(0.3)
        await pilot.pause(0.2)

    assert snap_compare(app, terminal_size=(120, 30), run_before=run_before)
