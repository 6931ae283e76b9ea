"""Cluster specs and host resolution through an ssh config file (never the operator's own)."""

from __future__ import annotations

import pytest

from engine.core.errors import RecipeError
from remote.hosts import ClusterSpec, NodeSpec, cluster_from, resolve_cluster, resolve_host

CONFIG = """
Host gpu-*
  User ops
  IdentityFile ~/.ssh/id_gpu
Host gpu-a
  HostName 10.0.0.11
  Port 2222
Host gpu-b
  HostName 10.0.0.12
  ProxyJump jumper@bastion.example:2200
Host legacy
  ProxyCommand nc %h %p
"""


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "ssh_config"
    p.write_text(CONFIG)
    return p


def test_alias_resolves_hostname_port_user_key(cfg):
    h = resolve_host(NodeSpec("a", "gpu-a"), cfg)
    assert (h.hostname, h.port, h.user) == ("10.0.0.11", 2222, "ops")
    assert h.key_filenames[0].endswith("/.ssh/id_gpu") and "~" not in h.key_filenames[0]
    assert h.known_hosts_name == "[10.0.0.11]:2222" and h.jump is None


def test_recipe_values_win_over_the_config(cfg):
    h = resolve_host(NodeSpec("a", "gpu-a", user="root", port=22, key="/k"), cfg)
    assert (h.user, h.port, h.key_filenames, h.known_hosts_name) == ("root", 22, ("/k",), "10.0.0.11")


def test_proxyjump(cfg):
    h = resolve_host(NodeSpec("b", "gpu-b"), cfg)
    assert h.hostname == "10.0.0.12" and h.port == 22
    assert (h.jump.hostname, h.jump.port, h.jump.user) == ("bastion.example", 2200, "jumper")


def test_proxycommand_is_refused_with_a_hint(cfg):
    with pytest.raises(RecipeError, match="ProxyCommand") as ei:
        resolve_host(NodeSpec("l", "legacy"), cfg)
    assert "ProxyJump" in ei.value.hint


def test_missing_config_is_fine(tmp_path):
    h = resolve_host(NodeSpec("x", "10.1.1.1", user="u"), tmp_path / "nope")
    assert (h.hostname, h.port, h.user) == ("10.1.1.1", 22, "u")


def test_cluster_from_dict_and_env_fallbacks(cfg, monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(cfg))
    monkeypatch.setenv("QUANTDECK_KNOWN_HOSTS", str(tmp_path / "kh"))
    c = cluster_from({"nodes": ["gpu-a", {"name": "b", "host": "gpu-b", "gpus": 8}], "workdir": "/shared/w",
                      "gpus_per_node": 4})
    assert c.head_name == "gpu-a" and c.work_dir == "/shared/w"
    assert [n.gpus for n in c.nodes] == [4, 8]
    assert c.ssh_config_path == cfg and c.known_hosts_path == tmp_path / "kh"
    hosts = resolve_cluster(c)
    assert list(hosts) == ["gpu-a", "b"] and hosts["gpu-a"].port == 2222


def test_cluster_from_the_engine_recipe_model():
    from engine.runs.recipe import recipe_from_dict

    r = recipe_from_dict({"source": {"path": "/m"}, "cluster": {
        "head": "n1", "python": "/opt/py/bin/python", "host_key_policy": "accept-new",
        "nodes": [{"name": "n0", "host": "10.0.0.1", "gpus": 8}, {"name": "n1", "host": "10.0.0.2", "user": "u"}]}})
    c = cluster_from(r.cluster)
    assert c.head_name == "n1" and c.python == "/opt/py/bin/python" and c.host_key_policy == "accept-new"
    assert c.node("n1").user == "u" and c.node("n0").gpus == 8


@pytest.mark.parametrize("kw, match", [
    ({"nodes": ()}, "no nodes"),
    ({"nodes": (NodeSpec("a", "h"), NodeSpec("a", "h2"))}, "repeat"),
    ({"nodes": (NodeSpec("a", "h"),), "head": "zz"}, "head 'zz' is not a node"),
    ({"nodes": (NodeSpec("a", "h"),), "host_key_policy": "yolo"}, "accept-new"),
])
def test_bad_clusters_name_the_field(kw, match):
    with pytest.raises(RecipeError, match=match):
        ClusterSpec(**kw)


def test_recipe_default_port_leaves_the_ssh_config_port(cfg, monkeypatch):
    from engine.runs.recipe import recipe_from_dict

    monkeypatch.setenv("QUANTDECK_SSH_CONFIG", str(cfg))
    nodes = [{"name": "gpu-a"}, {"name": "x", "host": "gpu-a", "port": 22}]
    r = recipe_from_dict({"source": {"path": "/m"}, "cluster": {"nodes": nodes}})
    hosts = resolve_cluster(cluster_from(r.cluster))
    assert hosts["gpu-a"].port == 2222 and hosts["gpu-a"].hostname == "10.0.0.11"  # Port from the config
    assert hosts["x"].port == 22  # written in the recipe: wins
