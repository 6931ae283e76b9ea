"""`quantdeck nodes RECIPE` against the four real sshd nodes (CPU nodes: "no GPU")."""

from __future__ import annotations

import json
import sys

from console.cli import main


def write_recipe(c, tmp_path):
    nodes = "\n".join(f'[[cluster.nodes]]\nname = "{n["name"]}"\nhost = "{n["host"]}"\nport = {n["port"]}\n'
                      f'user = "{n["user"]}"\nkey = "{n["key"]}"\n' for n in c.cluster_dict()["nodes"])
    p = tmp_path / "recipe.toml"
    p.write_text(f'[run]\nworkdir = "{c.work_dir}"\n\n[source]\npath = "/nowhere"\n\n'
                 f'[cluster]\npython = "{sys.executable}"\n\n{nodes}')
    return p


def test_nodes_once_then_with_a_dead_node(sshd_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(sshd_cluster.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(sshd_cluster.ssh_config))
    recipe = write_recipe(sshd_cluster, tmp_path)
    assert main(["nodes", str(recipe), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["node"] for d in data] == ["node0", "node1", "node2", "node3"]
    assert all(d["state"] == "no-gpu" and d["gpus"] == [] and d["ram_total"] > 0 and d["disk_free"] > 0
               for d in data)

    sshd_cluster.node("node1").kill()
    assert main(["nodes", str(recipe)]) == 6
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith(" ")}
    assert "unreachable" in rows["node1"] and "no GPU" in rows["node0"] and "no GPU" in rows["node3"]
    assert "quantdeck: error: 1 of 4 nodes not read: node1" in err


def test_unknown_host_key_shows_in_the_table(sshd_cluster, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "kh"
    empty.write_text("")
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(empty))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(sshd_cluster.ssh_config))
    assert main(["nodes", str(write_recipe(sshd_cluster, tmp_path))]) == 6
    out, _ = capsys.readouterr()
    assert "unknown host key for node0" in out and "SHA256:" in out


def test_nodes_watch_refreshes_then_stops_after_count(sshd_cluster, tmp_path, monkeypatch, capsys):
    """`--watch --count 3`: three tables of the four live nodes, then exit 0 (no Ctrl-C needed)."""
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(sshd_cluster.known_hosts))
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(sshd_cluster.ssh_config))
    recipe = write_recipe(sshd_cluster, tmp_path)
    assert main(["nodes", str(recipe), "--watch", "--count", "3", "--interval", "0.3", "--json"]) == 0
    out = capsys.readouterr().out
    tables, dec, i = [], json.JSONDecoder(), 0
    while i < len(out):
        if out[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(out, i)
        tables.append(obj)
    assert len(tables) == 3
    for t in tables:
        assert [d["node"] for d in t] == ["node0", "node1", "node2", "node3"]
        assert all(d["state"] == "no-gpu" and d["ram_total"] > 0 for d in t)
    assert max(d["ts"] for d in tables[-1]) >= max(d["ts"] for d in tables[0])
