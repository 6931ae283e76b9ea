"""Fleet adapters over remote.telemetry: states, stale age, widened replay of the real recordings."""

from console.fleet import node_view, replay_fleet_4x8
from console.models import HOST_NO_GPU, HOST_OK, HOST_STALE


def test_replay_4x8_has_a_stale_node_and_a_cpu_node():
    t0 = 1_000_000.0
    feed = replay_fleet_4x8(clock=lambda: t0, start=False, stale_for_s=47.0)
    nodes = {n.name: n for n in feed.poll()}
    assert [nodes[f"node{i}"].state for i in range(4)] == [HOST_OK, HOST_OK, HOST_STALE, HOST_NO_GPU]
    assert len(nodes["node0"].gpus) == 8 and len(nodes["node1"].gpus) == 8
    assert nodes["node2"].sampled_at == t0 - 47.0 and len(nodes["node2"].gpus) == 8  # last good values
    assert nodes["node3"].gpus == ()
    g = nodes["node0"].gpus[0]
    assert g.name == "NVIDIA H200" and round(g.mem_total_mib) == 143771  # the recorded H200


def test_replay_advances_frames_without_blocking():
    feed = replay_fleet_4x8(start=False)
    a = [g.mem_used_mib for g in feed.poll()[0].gpus]
    feed.source.advance()
    feed.source.advance()
    b = [g.mem_used_mib for g in feed.poll()[0].gpus]
    assert a != b


def test_unreachable_sample_has_no_time():
    from remote.telemetry import NodeSample, NodeState

    v = node_view(NodeSample(node="n", state=NodeState.UNREACHABLE, ts=5.0, error="refused"))
    assert v.sampled_at is None and v.error == "refused" and v.state == "unreachable"
