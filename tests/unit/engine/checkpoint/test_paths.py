"""An output is refused in, at or around its own source (engine.checkpoint.paths), on real directories."""

from __future__ import annotations

import pytest

from engine.checkpoint.paths import layout_dirs, partial_path, refuse_overlap
from engine.core.errors import UsageError


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "models" / "ckpt"
    d.mkdir(parents=True)
    (tmp_path / "link").symlink_to(d)
    return d


@pytest.mark.parametrize("dst, says", [
    ("models/ckpt", "must differ"),
    ("models/ckpt/out", "inside the source directory"),
    ("models/x/../ckpt/out", "inside the source directory"),
    ("link/out", "inside the source directory"),  # through a symlink to the source
    ("models", "the source"),  # one layout: --dst itself would hold the source
])
def test_dst_at_inside_or_around_the_source_is_refused(src, tmp_path, dst, says):
    with pytest.raises(UsageError) as ei:
        refuse_overlap(src, tmp_path / dst)
    assert says in ei.value.msg and ei.value.at == "--dst" and "outside the source directory" in ei.value.hint


def test_source_that_is_the_outputs_partial_dir_is_refused(tmp_path):
    src = tmp_path / "out.partial"  # the writer would clear it as a stale build of another job
    src.mkdir()
    with pytest.raises(UsageError, match="is .*out.partial, where --dst"):
        refuse_overlap(src, tmp_path / "out")
    with pytest.raises(UsageError, match="modelopt.partial"):
        refuse_overlap(tmp_path / "base" / "modelopt.partial", tmp_path / "base",
                       layout_dirs(tmp_path / "base", ["modelopt", "compressed-tensors"]).values())


def test_apart_outputs_pass(src, tmp_path):
    refuse_overlap(src, tmp_path / "out")
    refuse_overlap(src, tmp_path / "models" / "ckpt-nvfp4")  # a sibling whose name starts like the source's
    base = tmp_path / "models"  # several layouts: the base dir may hold the source beside the outputs
    refuse_overlap(src, base, layout_dirs(base, ["modelopt", "compressed-tensors"]).values())
    assert partial_path(tmp_path / "out") == tmp_path / "out.partial"
