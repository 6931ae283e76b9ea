"""A whole run with `source = "s3://…"` and `[push]` on S3 (moto's server): pull → … → push completes, the
pushed checkpoint is byte-identical to the run's output, and no credential reaches the run dir or store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.integration.s3_server import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    FAKE_TOKEN,
    apply_env,
    client,
    fake_env,
    get_server,
    same_tree,
)


@pytest.mark.slow
def test_run_with_s3_source_and_push_completes(tmp_path, monkeypatch, tiny_ckpt):
    from engine.api import open_engine
    from engine.s3 import pull, push

    server = get_server()
    env = fake_env(tmp_path)
    apply_env(monkeypatch, env)
    client(server).create_bucket(Bucket="qd-run")
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)  # the session-cached tiny checkpoint (shared, read-only)
    push(src, "s3://qd-run/models/tiny-v3", endpoint_url=server.url,  # the operator's upload of the source
         manifest=tmp_path / "upload.json")

    work = tmp_path / "work"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[run]
workdir = "{work}"
device = "cpu"

[source]
path = "s3://qd-run/models/tiny-v3"
endpoint_url = "{server.url}"

[target]
format = "nvfp4"
calibrate = false
layouts = ["modelopt"]

[push]
target = "s3://qd-run/models/tiny-v3-nvfp4"
endpoint_url = "{server.url}"
part_size_mb = 5
concurrency = 4
""")
    eng = open_engine(str(work))
    run = eng.start(str(recipe), env=env)
    deadline = time.monotonic() + 180
    view = eng.status(run)
    while view.result in ("RUNNING", "PENDING") and time.monotonic() < deadline:
        time.sleep(0.5)
        view = eng.status(run)
    states = {s.name: (s.state, s.error) for s in view.stages}
    assert view.result == "SUCCEEDED", states
    assert [s.name for s in view.stages][0] == "pull" and [s.name for s in view.stages][-1] == "push"
    pulled = next(s for s in view.stages if s.name == "pull").result
    assert pulled["transferred"] == pulled["objects"] > 1

    # what the push stage put in the bucket is the run's output, byte for byte
    output = Path(eng.plan(run)["output"])
    back = tmp_path / "back"
    pull("s3://qd-run/models/tiny-v3-nvfp4", back, endpoint_url=server.url)
    assert same_tree(output, back) == []
    assert same_tree(src, Path(eng.plan(run)["source"])) == []

    # no credential in the run dir (status, events, logs, plan) or the store
    home = Path(os.environ["QUANTDECK_HOME"])
    for p in [*work.rglob("*"), *home.rglob("*")]:
        if p.is_file():
            data = p.read_bytes()
            for s in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN):
                assert s.encode() not in data, p
