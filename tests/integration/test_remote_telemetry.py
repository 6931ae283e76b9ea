"""Telemetry of four real sshd nodes (CPU nodes: "no GPU"), one of them killed: stale, others stay fresh."""

from __future__ import annotations

import socket
import time

from remote.hosts import cluster_from
from remote.monitor import TelemetryMonitor
from remote.telemetry import NodeState


def wait_for(pred, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def test_four_nodes_one_killed_goes_stale_others_stay_fresh(sshd_cluster):
    hung = socket.socket()  # a fifth node that accepts TCP and never speaks: must not slow anyone
    hung.bind(("127.0.0.4", 0))
    hung.listen(8)
    c = sshd_cluster.cluster_dict(connect_timeout=2.0)
    c["nodes"].append({"name": "hung", "host": "127.0.0.4", "port": hung.getsockname()[1],
                       "key": str(sshd_cluster.client_key)})
    cl = cluster_from(c)
    mon = TelemetryMonitor.for_cluster(cl, interval_s=0.3, stale_after=3.0)
    mon.start()
    try:
        assert wait_for(lambda: all(s.state is NodeState.NO_GPU for s in mon.snapshot()[:4]))
        snap = {s.node: s for s in mon.snapshot()}
        for n in ("node0", "node1", "node2", "node3"):
            s = snap[n]
            assert s.error is None and s.gpus == ()
            assert 0 < s.ram_used < s.ram_total and s.disk_free > 0
        # the hung node is still connecting (2 s timeout) while the others have several samples each
        assert snap["hung"].state is NodeState.UNREACHABLE
        assert len(mon.history("node0")) >= 1

        sshd_cluster.node("node2").kill()
        assert wait_for(lambda: {s.node: s for s in mon.snapshot()}["node2"].state is NodeState.STALE)
        n_before = {n: len(mon.history(n)) for n in ("node0", "node1", "node3")}
        time.sleep(1.0)
        snap = {s.node: s for s in mon.snapshot()}
        s2 = snap["node2"]
        assert s2.state is NodeState.STALE and s2.ram_total and s2.age > 0 and s2.error
        for n in ("node0", "node1", "node3"):  # untouched by node2's death: fresh, new samples keep coming
            assert snap[n].state is NodeState.NO_GPU and time.time() - snap[n].ts < 1.5
            assert len(mon.history(n)) > n_before[n]
        assert wait_for(lambda: "does not answer" in ({s.node: s for s in mon.snapshot()}["hung"].error or ""))

        sshd_cluster.node("node2").start()  # it comes back: fresh again (reconnect with backoff)
        assert wait_for(lambda: {s.node: s for s in mon.snapshot()}["node2"].state is NodeState.NO_GPU, timeout=20)
    finally:
        mon.close()
        hung.close()


def test_monitor_built_straight_from_a_recipe_cluster(sshd_cluster, monkeypatch):
    from engine.runs.recipe import recipe_from_dict

    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(sshd_cluster.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(sshd_cluster.ssh_config))
    d = sshd_cluster.cluster_dict()
    recipe = recipe_from_dict({"source": {"path": "/m"}, "cluster": {
        "workdir": d["work_dir"], "nodes": [{k: n[k] for k in ("name", "host", "port", "user", "key")}
                                            for n in d["nodes"]]}})
    mon = TelemetryMonitor(recipe.cluster, interval_s=0.5)  # what the console's factory does
    try:
        assert [mon.poll_once(n).state for n in mon.nodes()] == [NodeState.NO_GPU] * 4
    finally:
        mon.close()
