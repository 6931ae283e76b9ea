"""ReplayTelemetrySource: the console's stand-in for a GPU fleet, replaying real recordings."""

from __future__ import annotations

import time

import pytest

from remote.telemetry import NodeState, ReplayTelemetrySource


def test_demo_fleet_states():
    src = ReplayTelemetrySource.demo()
    assert src.nodes() == ["node0", "node1", "node2", "cpu0"]
    snap = {s.node: s for s in src.snapshot()}
    assert snap["node0"].state is NodeState.OK and len(snap["node0"].gpus) == 2
    assert snap["node2"].gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert snap["cpu0"].state is NodeState.NO_GPU and snap["cpu0"].error is None
    src.advance(3)  # node2 went quiet: stale, with its last good values and their age
    s2 = {s.node: s for s in src.snapshot()}["node2"]
    assert s2.state is NodeState.STALE and s2.gpus[0].mem_used > 0 and s2.age >= 0 and s2.error
    assert len(src.history("node0")) == 4


def test_unreachable_from_the_start():
    src = ReplayTelemetrySource.from_recordings({"a": ["unreachable"], "b": ["query_idle_1gpu.csv"]})
    a, b = src.snapshot()
    assert a.state is NodeState.UNREACHABLE and a.gpus == () and a.error
    assert b.state is NodeState.OK


def test_unknown_recording_lists_known():
    with pytest.raises(KeyError, match="query_idle_1gpu.csv"):
        ReplayTelemetrySource.from_recordings({"a": ["nope.csv"]})


def test_no_loop_holds_last():
    src = ReplayTelemetrySource.from_recordings({"a": ["query_idle_1gpu.csv", "query_busy_1gpu.csv"]}, loop=False)
    src.advance(5)
    assert src.snapshot()[0].gpus[0].util == 100


def test_timer_thread_replays():
    src = ReplayTelemetrySource.from_recordings({"a": ["query_idle_2gpu.csv", "query_busy_2gpu.csv"]},
                                                interval_s=0.05)
    src.start()
    try:
        deadline = time.time() + 5
        while len(src.history("a")) < 3 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        src.stop()
    assert len(src.history("a")) >= 3
