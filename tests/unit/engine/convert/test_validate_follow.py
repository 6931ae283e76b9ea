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
def sharded(tiny_nvfp4):
    src, out = tiny_nvfp4("fp8", shard_size="60KB")
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


def _checked_then_zeroed(sharded, tmp_path):
    """A copy of the output, followed (every shard checked), then a block scale set to 0 in place (a failure
    validate names): (source, output, the follower, the scale's name, its meta)."""
    import shutil

    src, out0 = sharded
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    f = Follower(out, src)
    f.step(CheckpointReader(src))
    r = CheckpointReader(out)
    name = next(n for n in r.names() if n.endswith("mlp.experts.1.down_proj.weight_scale"))
    m = r.meta(name)
    with open(out / m.shard, "r+b") as fh:
        fh.seek(m.start)
        fh.write(b"\x00")
    return src, out, f, name, m


def test_a_shard_changed_after_it_was_checked_is_read_again(sharded, tmp_path):
    src, out, f, name, m = _checked_then_zeroed(sharded, tmp_path)
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
    assert any(d == partial_path(out) for _, d in f.checked)  # checked while the conversion still wrote
    assert _report(validate_checkpoint(out, against=src, earlier=earlier)) == \
        _report(validate_checkpoint(out, against=src))
    assert earlier.taken > 0


def test_findings_made_against_another_source_or_none_are_not_taken(sharded):
    src, out = sharded
    f = Follower(out, None)  # no source: the modules were not compared
    f.step(None)
    assert f.earlier.found
    rep = validate_checkpoint(out, against=src, earlier=f.earlier)
    assert f.earlier.taken == 0 and _report(rep) == _report(validate_checkpoint(out, against=src))


def test_a_module_whose_tensors_were_not_all_written_is_checked_again_whole(tmp_path):
    """Shard 1 holds an FP8 weight with a scale of zeros under `.scale`; shard 2, finished later, the
    `.weight_scale_inv` validate reads first. The finding made from shard 1 alone (bad scales) is not the module's."""
    import torch

    from engine.checkpoint.safetensors_format import TensorSpec
    from engine.checkpoint.shard_plan import ShardPlan
    from engine.checkpoint.writer import CheckpointWriter

    out = tmp_path / "out"
    w = (torch.randn(256, 256) * 0.1).to(torch.float8_e4m3fn)
    parts = [{"m.x.weight": w, "m.x.scale": torch.zeros(2, 2)}, {"m.x.weight_scale_inv": torch.ones(2, 2)}]
    plans = [ShardPlan(f"model-0000{i + 1}-of-00002.safetensors",
                       tuple(TensorSpec.of(k, v.dtype, v.shape) for k, v in t.items())) for i, t in enumerate(parts)]
    wr = CheckpointWriter(out, plans, source_fingerprint="x", args={})
    todo = wr.prepare()

    def write(plan, tensors):
        sf = wr.open_shard(plan)
        for k, v in tensors.items():
            sf.write(k, v)
        sf.close()

    write(todo[0], parts[0])
    f = Follower(out, None)
    assert f.step(None) == 1 and f.earlier.found
    write(todo[1], parts[1])
    wr.finalize()
    alone = validate_checkpoint(out)
    rep = validate_checkpoint(out, earlier=f.earlier)
    assert _report(rep) == _report(alone) and not any("m.x.scale" in (x["at"] or "") for x in rep["failures"])


def test_findings_compared_with_one_source_are_not_taken_against_another(sharded, tmp_path):
    import shutil

    src, out = sharded
    other = tmp_path / "other-src"
    shutil.copytree(src, other)
    r = CheckpointReader(other)
    m = r.meta("model.layers.1.mlp.experts.0.down_proj.weight")
    with open(other / m.shard, "r+b") as fh:  # the same names and shapes, other values
        fh.seek(m.start)
        fh.write(bytes(m.nbytes))
    f = Follower(out, src)
    f.step(CheckpointReader(src))
    rep = validate_checkpoint(out, against=other, earlier=f.earlier)
    alone = validate_checkpoint(out, against=other)
    assert f.earlier.taken == 0 and _report(rep) == _report(alone)
    assert _report(alone)["tensors"] != _report(validate_checkpoint(out, against=src))["tensors"]


def test_a_shard_changed_and_checked_again_only_in_part_keeps_nothing_of_its_first_check(sharded, tmp_path):
    """A shard checked, then changed in place and recorded again (a new manifest), then checked again with the
    follower stopped before any job began (validate starting): nothing found in its first check is taken."""
    import json

    src, out, f, _, _ = _checked_then_zeroed(sharded, tmp_path)
    man = out / "manifest.json"
    man.write_text(json.dumps(json.loads(man.read_text())))  # recorded again: another manifest file
    f._stop.set()
    f.step(CheckpointReader(src))
    alone = validate_checkpoint(out, against=src)
    rep = validate_checkpoint(out, against=src, earlier=f.earlier)
    assert not alone["ok"] and _report(rep) == _report(alone)
