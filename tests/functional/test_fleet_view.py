"""The fleet view and the quality figures, driven with Pilot: one row per node folded, one per GPU on focus, quiet
ranks on their GPUs, node states, singular and plural, validate and eval figures (and "—" without them)."""

from __future__ import annotations

import json
from dataclasses import replace

from static_backend import T0, StaticBackend, snapshot_run, stage, stalled_run

from console.factory import build_app
from console.fleet import replay_fleet_4x8
from console.messages import FleetSampled
from console.models import GpuView, NodeView
from console.screens.dashboard import quiet_gpus
from console.widgets import FleetTable, QualityPanel, StageTable
from console.widgets.run.quality_panel import quality_lines
from engine.api import QualityView
from engine.runs.figures import QualityReader


def _plain(cell) -> str:
    return getattr(cell, "plain", cell)


async def _dashboard(pilot, app, nodes):
    while app.dashboard is None or app.run_view is None:
        await pilot.pause(0.02)
    app.post_message(FleetSampled(nodes))
    await pilot.pause(0.3)
    return app.dashboard


def _replayed(cpu_node=False):
    feed = replay_fleet_4x8(clock=lambda: T0, start=False, cpu_node=cpu_node)
    feed.source.advance()
    return feed.poll()


async def test_fleet_folds_to_a_row_per_node_and_opens_per_gpu_on_focus(fixed_clock):
    app = build_app(backend=StaticBackend(run=stalled_run()), use_fleet=False, clock=fixed_clock, follow_s=60)
    async with app.run_test(size=(80, 24)) as pilot:
        dash = await _dashboard(pilot, app, _replayed())
        fleet = dash.query_one(FleetTable)
        assert fleet.row_keys == ["node0", "node1", "node2", "node3"]
        cells = {k: [_plain(c) for c in fleet._rows[k]] for k in fleet.row_keys}
        assert all(len(cells[k][1]) == 8 for k in cells)  # one cell per GPU
        assert cells["node2"][6] == "stale 47s" and cells["node0"][6] == "ok"
        assert cells["node1"][6] == "ok r11,12 quiet"  # eval's quiet ranks 11 and 12 run on node1
        spans = fleet._rows["node1"][1].spans
        assert [s.start for s in spans if "yellow" in str(s.style)] == [3, 4]  # its GPUs 3 and 4
        assert "32 GPUs" in str(dash.query_one("#fleet-box").border_title)
        assert "eval stalled 15m12s r11,12 quiet" in str(dash.query_one("#stages-box").border_title)
        # the stalled stage's row is in view at 80 × 24 (the 8th of 8 stages)
        table = dash.query_one(StageTable)
        assert table.selected_stage == "eval" and table.scroll_offset.y >= 1

        await pilot.press("tab")
        await pilot.pause(0.2)
        assert fleet.has_focus and fleet.expanded and fleet.row_count == 32
        assert _plain(fleet._rows["node1/3"][7]) == "rank 11 quiet"
        assert "esc: fold" in str(dash.query_one("#fleet-box").border_title)
        await pilot.press("escape")
        await pilot.pause(0.2)
        assert not fleet.expanded and fleet.row_count == 4 and dash.query_one(StageTable).has_focus


async def test_node_states_and_singular_counts(fixed_clock):
    now = T0
    one = (NodeView("gpu1", "gpu1", "ok", now, (GpuView(0, "NVIDIA H100", 40_000, 81_559, 90),)),)
    app = build_app(backend=StaticBackend(), use_fleet=False, clock=fixed_clock, follow_s=60)
    async with app.run_test(size=(80, 24)) as pilot:
        dash = await _dashboard(pilot, app, one)
        title = str(dash.query_one("#fleet-box").border_title)
        assert "1 node · 1 GPU" in title and "nodes" not in title and "GPUs" not in title
        app.post_message(FleetSampled(one + (NodeView("gone", "gone", "unreachable", now - 185.0),
                                             NodeView("cpu", "cpu", "no GPU", now),
                                             NodeView("new", "new", "unreachable"))))
        await pilot.pause(0.3)
        fleet = dash.query_one(FleetTable)
        state = {k: _plain(fleet._rows[k][6]) for k in fleet.row_keys}
        assert state == {"gpu1": "ok", "gone": "unreachable 3m05s", "cpu": "no GPU", "new": "unreachable"}
        assert _plain(fleet._rows["cpu"][1]) == "no GPU" and _plain(fleet._rows["gone"][1]) == "?"
        assert "4 nodes · 1 GPU · 2 not answering" in str(dash.query_one("#fleet-box").border_title)


async def test_quality_figures_on_the_dashboard_and_dashes_without_them(fixed_clock):
    app = build_app(backend=StaticBackend(run=stalled_run()), use_fleet=False, clock=fixed_clock, follow_s=60)
    async with app.run_test(size=(160, 50)) as pilot:
        dash = await _dashboard(pilot, app, _replayed())
        text = str(dash.query_one(QualityPanel).render())
        assert "worst 0.0912" in text and "experts.17.down_proj" in text and "KLD —  top-1 —" in text
    app = build_app(backend=StaticBackend(run=snapshot_run()), use_fleet=False, clock=fixed_clock, follow_s=60)
    async with app.run_test(size=(80, 24)) as pilot:
        dash = await _dashboard(pilot, app, _replayed())
        text = str(dash.query_one(QualityPanel).render())
        assert "worst —" in text and "pending" in text and "KLD —  top-1 —" in text


def test_quality_lines_show_eval_figures():
    q = QualityView(worst_tensor="model.layers.58.mlp.experts.201.down_proj", worst_rel_err=0.1043,
                    kld_mean=0.0213, top1_agree=0.9412, validate_state="SUCCEEDED", eval_state="SUCCEEDED")
    worst, where, ev = (t.plain for t in quality_lines(q, 24))
    assert worst == "validate worst 0.1043 rel. err"
    assert where == "…" + q.worst_tensor[-23:]
    assert ev == "eval KLD 0.0213  top-1 94.1%"
    assert [t.plain for t in quality_lines(None, 30)] == ["validate worst —", "no validate stage",
                                                          "eval KLD —  top-1 —"]


def test_quality_reader_takes_the_worst_tensor_from_the_report_and_eval_from_its_result(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({
        "/out/modelopt": {"ok": True, "tensors": [{"tensor": "a.q_proj", "rel_err": 0.08},
                                                  {"tensor": "b.down_proj", "rel_err": 0.11}]},
        "/out/compressed-tensors": {"ok": True, "tensors": [{"tensor": "c.up_proj", "rel_err": 0.09}]}}))

    class S:  # a stage view: name, state, result
        def __init__(self, name, state, result=None):
            self.name, self.state, self.result = name, state, result

    reader = QualityReader()
    q = reader.view([S("validate", "SUCCEEDED", {"outputs": []}),
                     S("eval", "SUCCEEDED", {"kld_mean": 0.012, "kld_p99": 0.2, "top1_agree": 0.97})],  # summary_of's
                    str(report))
    assert (q.worst_tensor, q.worst_rel_err) == ("b.down_proj", 0.11)
    assert (q.kld_mean, q.kld_p99, q.top1_agree) == (0.012, 0.2, 0.97)
    q = reader.view([S("validate", "PENDING")], str(report))
    assert q.worst_rel_err is None and q.kld_mean is None and q.eval_state == "" and q.validate_state == "PENDING"
    assert reader.view([S("calibrate", "RUNNING")], None) is None
    q = reader.view([S("eval", "SUCCEEDED", {"kld_mean": 0.5, "top1_agree": 0.8})], None)
    assert (q.kld_mean, q.top1_agree) == (0.5, 0.8)


def test_quiet_ranks_map_to_their_nodes_gpus():
    parts = tuple((r, f"node{r // 8}", 1, 2) for r in range(16))
    st = stage("calibrate", "RUNNING", ranks=16, rank_parts=parts, stalled=True, silent_s=900.0, quiet=(3, 9))
    run = snapshot_run()
    assert quiet_gpus(replace(run, stages=(st,))) == {"node0": {3: 3}, "node1": {1: 9}}
    single = stage("export", "RUNNING", host="node2", stalled=True, silent_s=950.0, quiet=(0,))
    assert quiet_gpus(replace(run, stages=(single,))) == {"node2": {0: 0}}
    assert quiet_gpus(run) == {}
