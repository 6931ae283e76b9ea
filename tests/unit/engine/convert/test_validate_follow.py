"""validate's pass beside the conversion: shards checked as they are finished give the report validate gives alone,
and a shard changed after it was checked is read again."""

from __future__ import annotations

import os
import threading
import time

import pytest

from engine.checkpoint import CheckpointReader
from engine.checkpoint.paths import partial_path
from engine.convert import convert_checkpoint
from engine.convert.validate import validate_checkpoint
from engine.convert.validate_follow import Follower


def _report(rep):
    """A report without its directory names (the checks, findings, verdict)."""
    return {k: rep[k] for k in ("ok", "checks", "failures", "warnings", "tensors", "format")}


@pytest.fixture(scope="module")
def sharded(tiny_ckpt, tmp_path_factory):
    src = tiny_ckpt("deepseek-v3", "fp8")
    out = tmp_path_factory.mktemp("follow") / "out"
    convert_checkpoint(src, out, to="nvfp4", shard_size="60KB")
    assert len(CheckpointReader(out).shards()) > 3
    return src, out


def test_a_followed_output_gives_the_report_validate_gives_alone(sharded):
    src, out = sharded
    alone = validate_checkpoint(out, against=src)
    f = Follower(out, src)
    assert f.step(CheckpointReader(src)) == len(CheckpointReader(out).shards())
    assert f.earlier.found and f.error is None
    rep = validate_checkpoint(out, against=src, earlier=f.earlier)
    assert alone["ok"] and _report(rep) == _report(alone)
    assert f.earlier.taken == len(f.earlier.found) > 0


def test_a_shard_changed_after_it_was_checked_is_read_again(sharded, tmp_path):
    import shutil

    src, out0 = sharded
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    f = Follower(out, src)
    f.step(CheckpointReader(src))
    r = CheckpointReader(out)
    name = next(n for n in r.names() if n.endswith("mlp.experts.1.down_proj.weight_scale"))
    m = r.meta(name)
    with open(out / m.shard, "r+b") as fh:  # a block scale of 0: a failure validate names
        fh.seek(m.start)
        fh.write(b"\x00")
    st = os.stat(out / m.shard)
    os.utime(out / m.shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    alone = validate_checkpoint(out, against=src)
    rep = validate_checkpoint(out, against=src, earlier=f.earlier)
    assert not alone["ok"] and _report(rep) == _report(alone)
    assert any(name in (x["at"] or "") for x in rep["failures"])


def test_shards_are_followed_as_the_writer_finishes_them(tiny_ckpt, tmp_path, monkeypatch):
    """A conversion slowed down shard by shard: the follower checks the shards of `<out>.partial/` before the
    conversion ends, and validate's report after it is the one it gives alone."""
    from engine.checkpoint import writer

    src = tiny_ckpt("deepseek-v3", "fp8")
    out = tmp_path / "out"
    seen_partial = []
    close = writer.ShardFile.close

    def slow_close(self):
        got = close(self)
        time.sleep(0.15)
        seen_partial.append(partial_path(out).exists())
        return got

    monkeypatch.setattr(writer.ShardFile, "close", slow_close)
    f = Follower(out, src, poll_s=0.02).start()
    t = threading.Thread(target=convert_checkpoint, args=(src, out), kwargs=dict(to="nvfp4", shard_size="60KB"))
    t.start()
    t.join()
    earlier = f.stop()
    assert f.error is None and any(seen_partial)
    assert len(earlier.shards) >= 2
    assert _report(validate_checkpoint(out, against=src, earlier=earlier)) == \
        _report(validate_checkpoint(out, against=src))
