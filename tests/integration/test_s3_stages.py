"""The pull and push stages as the worker runs them (StageContext with the plan's params, events to a JSONL
file), and retries with backoff when the bucket throttles, with the count reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.events import JsonlSink, read_events
from engine.core.names import StageName
from engine.stages.base import Stage, StageContext
from tests.integration.s3_server import FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN, fresh_bucket, make_checkpoint, same_tree

MiB = 1 << 20


@pytest.fixture
def s3(request, tmp_path, monkeypatch):
    server, bucket, _ = fresh_bucket(request, tmp_path, monkeypatch)
    return server, bucket


def _ctx(tmp_path: Path, stage: str, params: dict) -> StageContext:
    import engine.stages

    engine.stages.load_all()
    run_dir = tmp_path / "run"
    stage_dir = run_dir / "stages" / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(run_dir=run_dir, stage_dir=stage_dir, params=params,
                        sink=JsonlSink(stage_dir / "events.jsonl", stage=stage))


def test_push_and_pull_stages_with_the_plans_params_and_validate_only(s3, tmp_path):
    server, bucket = s3
    src = make_checkpoint(tmp_path / "out", big_mib=6)
    url = f"s3://{bucket}/runs/out"
    push_ctx = _ctx(tmp_path, "push", {"src": str(src), "url": url, "endpoint_url": server.url,
                                       "part_size": 5 * MiB, "concurrency": 2,
                                       "inputs": {"dir": str(src)}, "outputs": {"url": url},
                                       "options": {"endpoint_url": server.url, "part_size_mb": 5}})
    push_stage = Stage.get(StageName.PUSH)()
    assert push_stage.check_saved(push_ctx)  # nothing pushed yet
    summary = push_stage.run(push_ctx)
    json.dumps(summary)
    assert summary["transferred"] == 7 and summary["manifest"] == str(push_ctx.stage_dir / "transfer.json")
    assert push_stage.check_saved(push_ctx) == []

    dst = tmp_path / "sources" / "out"
    pull_ctx = _ctx(tmp_path, "pull", {"inputs": {"url": url}, "outputs": {"dir": str(dst)},
                                       "options": {"endpoint_url": server.url}})
    pull_stage = Stage.get(StageName.PULL)()
    assert pull_stage.run(pull_ctx)["transferred"] == 7
    assert same_tree(src, dst) == [] and pull_stage.check_saved(pull_ctx) == []
    assert pull_stage.run(pull_ctx)["skipped"] == 7  # a rerun of a done pull moves nothing
    (dst / "config.json").unlink()
    assert any("config.json" in p for p in pull_stage.check_saved(pull_ctx))

    for ctx in (push_ctx, pull_ctx):
        ctx.sink.close()
        evs, _ = read_events(ctx.stage_dir / "events.jsonl")
        assert {e.kind for e in evs} >= {"progress", "log", "metric"}
        last = [e for e in evs if e.kind == "progress"][-1].data
        assert last["done"] == last["total"] == 7 and last["unit"] == "objects"
        blob = (ctx.stage_dir / "events.jsonl").read_text() + (ctx.stage_dir / "transfer.json").read_text()
        assert not any(s in blob for s in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN))


def test_throttled_requests_are_retried_with_backoff_and_counted(s3, tmp_path):
    from engine.core.events import CallbackSink
    from engine.s3 import pull, push

    server, bucket = s3
    src = make_checkpoint(tmp_path / "ck", big_mib=6)
    shard = f"/{bucket}/ck/model-00002-of-00003.safetensors"
    server.throttle("PUT", shard, 2)
    res = push(src, f"s3://{bucket}/ck", endpoint_url=server.url, part_size=5 * MiB)
    assert res.retries == 2 and res.transferred == 7

    server.throttle("GET", shard, 1)
    evs = []
    got = pull(f"s3://{bucket}/ck", tmp_path / "got", endpoint_url=server.url, sink=CallbackSink(evs.append))
    assert got.retries == 1 and same_tree(src, tmp_path / "got") == []
    assert any(e.kind == "metric" and e.data["name"] == "s3.retries" and e.data["value"] == 1 for e in evs)
    assert any(e.kind == "log" and "1 retries" in e.data["msg"] for e in evs)
