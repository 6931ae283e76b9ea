"""Per-node preflight over the four real sshd nodes plus a node that never answers."""

from __future__ import annotations

import socket
import sys
import time

from remote.hosts import cluster_from
from remote.preflight import preflight_cluster


def test_all_four_ready(sshd_cluster):
    assert preflight_cluster(sshd_cluster.cluster_dict()) == []


def test_silent_node_and_wrong_facts_fail_by_name_in_bounded_time(sshd_cluster, tmp_path):
    hung = socket.socket()
    hung.bind(("127.0.0.4", 0))
    hung.listen(4)
    c = sshd_cluster.cluster_dict(connect_timeout=2.0)
    c["nodes"][2]["gpus"] = 8  # node2 claims GPUs it does not have
    c["nodes"].append({"name": "ghost", "host": "127.0.0.4", "port": hung.getsockname()[1],
                       "key": str(sshd_cluster.client_key)})
    t0 = time.monotonic()
    try:
        fails = preflight_cluster(cluster_from(c))
    finally:
        hung.close()
    assert time.monotonic() - t0 < 8  # bounded: the silent node's 2 s timeout, checked in parallel
    assert len(fails) == 2, fails
    assert fails[0].startswith("node node2: the recipe says 8 GPUs, nvidia-smi sees 0")
    assert fails[1].startswith("node ghost: ghost (") and "does not answer" in fails[1]


def test_bad_python_and_missing_workdir(sshd_cluster, tmp_path):
    c = sshd_cluster.cluster_dict(python="/usr/bin/python3", work_dir=str(tmp_path / "not-mounted"), cwd="/",
                                  env={})
    fails = preflight_cluster(c)
    assert len(fails) == 8
    assert any("node node0: `/usr/bin/python3 -c 'import engine'` failed" in f for f in fails)
    assert any(f.startswith("node node3: work dir") and "missing" in f for f in fails)


def test_engine_preflight_with_remote_checks(sshd_cluster, tmp_path, monkeypatch):
    from engine.runs.preflight import run_preflight
    from remote.preflight import check_nodes

    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(sshd_cluster.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(sshd_cluster.ssh_config))
    nodes = "\n".join(f'[[cluster.nodes]]\nname = "{n["name"]}"\nhost = "{n["host"]}"\nport = {n["port"]}\n'
                      f'user = "{n["user"]}"\nkey = "{n["key"]}"\n' for n in sshd_cluster.cluster_dict()["nodes"])
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nworkdir = "{sshd_cluster.work_dir}"\n[source]\npath = "{tmp_path}/nope"\n'
                      f'[cluster]\npython = "{sys.executable}"\n{nodes}')
    sshd_cluster.node("node3").kill()
    fails = run_preflight(recipe, extra_checks=(check_nodes,))
    assert any(f.startswith("node node3: node3 (") for f in fails), fails
    assert not any(f.startswith(("node node0", "node node1", "node node2")) for f in fails)


def test_nodes_report_their_memory(sshd_cluster):
    """Each node that answers reports its host RAM (/proc/meminfo); these CPU nodes have no GPU memory to report."""
    memory: dict = {}
    assert preflight_cluster(sshd_cluster.cluster_dict(), memory=memory) == []
    assert sorted(memory) == ["node0", "node1", "node2", "node3"]
    for m in memory.values():
        assert m.ram_total and 0 < m.ram_available <= m.ram_total and m.gpu_free is None
