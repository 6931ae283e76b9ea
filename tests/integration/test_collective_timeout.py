"""A rank that never joins a collective (gloo, 2 torchrun ranks): the other rank's collective times out after the
configured process-group timeout, instead of hanging, with an error classified as a collective timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_rank_that_never_joins_ends_in_a_timeout_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", QUANTDECK_COLLECTIVE_TIMEOUT_S="3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.integration.hang_rank_worker", str(tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode != 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["error_class"] == "nccl-timeout", got
    assert "timed out" in got["error"] and "resume" in got["hint"]
    assert got["waited_s"] < 120, got  # the configured 3 s, not torch's default (30 min), nor rank 1 waking
