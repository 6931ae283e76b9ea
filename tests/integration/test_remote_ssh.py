"""SSH to four real sshd nodes: quoting, host-key verification, bounded failure of a silent node."""

from __future__ import annotations

import socket
import time

import pytest

from engine.core.errors import HostKeyError, RemoteError
from remote.hosts import cluster_from, resolve_cluster
from remote.ssh import ConnectionPool


def pool_for(c, **kw) -> ConnectionPool:
    return ConnectionPool.for_cluster(cluster_from(c.cluster_dict(**kw)))


def test_every_node_runs_argv_with_spaces_and_quotes_intact(sshd_cluster):
    pool = pool_for(sshd_cluster)
    nasty = ["it's a \"quoted\" arg", "$HOME `id` $(echo no)", "semi;colon && amp", "back\\slash", "tab\there", ""]
    try:
        for n in sshd_cluster.nodes:
            conn = pool.get(n.name)
            echo = "import json,sys,os; print(json.dumps([sys.argv[1:], os.environ.get('QD_X')]))"
            res = conn.run(["python3", "-c", echo, *nasty], env={"QD_X": "a b 'c'"}, check=True)
            import json
            assert json.loads(res.stdout) == [nasty, "a b 'c'"]
            # telemetry, commands and file reads share the one connection
            assert conn.connects == 1
    finally:
        pool.close()


def test_secret_env_reaches_the_process_but_not_the_command_line(sshd_cluster):
    pool = pool_for(sshd_cluster)
    try:
        conn = pool.get("node1")
        res = conn.run(["sh", "-c", 'echo "$HF_TOKEN"; cat /proc/$$/cmdline | tr "\\0" " "'],
                       env={"HF_TOKEN": "hf_s3cr3t 'x'", "PLAIN": "1"}, check=True)
        first, cmdline = res.stdout.split("\n", 1)
        assert first == "hf_s3cr3t 'x'"
        assert "s3cr3t" not in cmdline
    finally:
        pool.close()


def test_unknown_host_key_is_refused_with_its_fingerprint(sshd_cluster, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    pool = pool_for(sshd_cluster, known_hosts=str(empty))
    n = sshd_cluster.node("node2")
    import subprocess
    fp = subprocess.run(["ssh-keygen", "-lf", str(n.host_pub)], capture_output=True, text=True).stdout.split()[1]
    try:
        with pytest.raises(HostKeyError) as ei:
            pool.get("node2").connect()
        err = ei.value
        assert fp.startswith("SHA256:") and fp in err.msg
        assert err.at == "node2"
        assert f"ssh-keyscan -p {n.port} {n.addr} >> {empty}" in err.hint
        assert 'host_key_policy = "accept-new"' in err.hint
        assert empty.read_text() == ""  # nothing recorded without being asked
    finally:
        pool.close()


def test_accept_new_records_the_key_then_verifies_it(sshd_cluster, tmp_path):
    kh = tmp_path / "kh"
    pool = pool_for(sshd_cluster, known_hosts=str(kh), host_key_policy="accept-new")
    try:
        pool.get("node3").run(["true"], check=True)
    finally:
        pool.close()
    n = sshd_cluster.node("node3")
    assert kh.read_text().split()[:3] == n.known_hosts_line.split()[:3]
    pool = pool_for(sshd_cluster, known_hosts=str(kh))  # strict now, and it is known
    try:
        assert pool.get("node3").run(["echo", "ok"]).stdout == "ok\n"
    finally:
        pool.close()


def test_changed_host_key_is_refused(sshd_cluster, tmp_path):
    lines = sshd_cluster.known_hosts.read_text().splitlines()
    other = sshd_cluster.node("node1").known_hosts_line.split()[1:]
    n0 = sshd_cluster.node("node0")
    kh = tmp_path / "kh"
    kh.write_text(f"[{n0.addr}]:{n0.port} {' '.join(other)}\n")
    pool = pool_for(sshd_cluster, known_hosts=str(kh))
    try:
        with pytest.raises(HostKeyError, match="CHANGED") as ei:
            pool.get("node0").connect()
        assert "ssh-keygen -R" in ei.value.hint
    finally:
        pool.close()
    assert lines  # the shared file untouched


def test_a_silent_node_fails_by_name_within_a_bounded_time(sshd_cluster):
    # a listener that never speaks SSH (a hung host), and a port nobody listens on
    hung = socket.socket()
    hung.bind(("127.0.0.2", 0))
    hung.listen(16)
    dead = socket.socket()
    dead.bind(("127.0.0.3", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    c = sshd_cluster.cluster_dict(connect_timeout=1.5)
    c["nodes"] += [{"name": "hung", "host": "127.0.0.2", "port": hung.getsockname()[1],
                    "key": str(sshd_cluster.client_key)},
                   {"name": "gone", "host": "127.0.0.3", "port": dead_port, "key": str(sshd_cluster.client_key)}]
    pool = ConnectionPool.for_cluster(cluster_from(c))
    try:
        for name in ("hung", "gone"):
            t0 = time.monotonic()
            with pytest.raises(RemoteError) as ei:
                pool.get(name).connect()
            assert time.monotonic() - t0 < 5
            assert ei.value.at == name and name in ei.value.msg
        assert pool.get("node0").run(["true"]).ok
    finally:
        pool.close()
        hung.close()


def test_reconnect_after_the_node_comes_back(sshd_cluster):
    cl = cluster_from(sshd_cluster.cluster_dict())
    pool = ConnectionPool.for_cluster(cl, backoff_cap=0.2)
    n = sshd_cluster.node("node1")
    try:
        conn = pool.get("node1")
        assert conn.run(["echo", "1"]).stdout == "1\n"
        n.kill()
        with pytest.raises(RemoteError) as ei:
            conn.run(["echo", "2"])
        assert ei.value.at == "node1"
        n.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                assert conn.run(["echo", "3"]).stdout == "3\n"
                break
            except RemoteError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert conn.connects == 2
    finally:
        pool.close()


def test_ssh_config_alias_is_resolved(sshd_cluster):
    n = sshd_cluster.node("node2")
    sshd_cluster.ssh_config.write_text(
        f"Host gpu-b\n  HostName {n.addr}\n  Port {n.port}\n  User {sshd_cluster.user}\n"
        f"  IdentityFile {sshd_cluster.client_key}\n")
    cl = cluster_from({"nodes": [{"name": "b", "host": "gpu-b"}], "known_hosts": str(sshd_cluster.known_hosts),
                       "ssh_config": str(sshd_cluster.ssh_config), "connect_timeout": 5})
    hosts = resolve_cluster(cl)
    assert (hosts["b"].hostname, hosts["b"].port) == (n.addr, n.port)
    pool = ConnectionPool.for_cluster(cl)
    try:
        assert pool.get("b").run(["echo", "via alias"]).stdout == "via alias\n"
    finally:
        pool.close()


def test_proxyjump_through_the_head(sshd_cluster):
    n0, n3 = sshd_cluster.node("node0"), sshd_cluster.node("node3")
    u, k = sshd_cluster.user, sshd_cluster.client_key
    sshd_cluster.ssh_config.write_text(
        f"Host bastion\n  HostName {n0.addr}\n  Port {n0.port}\n  User {u}\n  IdentityFile {k}\n"
        f"Host inner\n  HostName {n3.addr}\n  Port {n3.port}\n  User {u}\n  IdentityFile {k}\n  ProxyJump bastion\n")
    cl = cluster_from({"nodes": [{"name": "inner", "host": "inner"}], "known_hosts": str(sshd_cluster.known_hosts),
                       "ssh_config": str(sshd_cluster.ssh_config), "connect_timeout": 5})
    host = resolve_cluster(cl)["inner"]
    assert host.jump is not None and host.jump.port == n0.port
    pool = ConnectionPool.for_cluster(cl)
    try:
        assert pool.get("inner").run(["echo", "jumped"]).stdout == "jumped\n"
    finally:
        pool.close()
