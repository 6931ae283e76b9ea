"""Fixtures for integration tests: a four-node cluster of real sshd on 127.0.0.1-127.0.0.4."""

from __future__ import annotations

import pytest

from tests.integration.sshd import SshdCluster, start_cluster


@pytest.fixture
def sshd_cluster(tmp_path) -> SshdCluster:
    """Four real sshd nodes (node0..node3) sharing tmp_path/work, with a per-test known_hosts and client key."""
    cluster = start_cluster(tmp_path / "sshd")
    try:
        yield cluster
    finally:
        cluster.stop()
