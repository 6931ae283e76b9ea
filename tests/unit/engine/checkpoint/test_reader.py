"""CheckpointReader: shard mapping, header-only metadata, one-tensor reads, and every error naming file+tensor."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointReader
from engine.core.errors import CheckpointError


def _two_shards(d):
    d.mkdir(exist_ok=True)
    a = {"x.weight": torch.randn(4, 8).to(torch.float8_e4m3fn), "x.weight_scale_inv": torch.rand(1, 1)}
    b = {"norm.weight": torch.randn(8).bfloat16(), "e.scale": torch.ones(2, 3).to(torch.float8_e8m0fnu)}
    save_file(a, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in a} | {k: "model-00002-of-00002.safetensors" for k in b}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    return a | b


def test_reads_meta_without_data_and_tensors_exactly(tmp_path):
    src = _two_shards(tmp_path / "ck")
    r = CheckpointReader(tmp_path / "ck")
    assert r.names() == sorted(src)
    m = r.meta("x.weight")
    assert (m.dtype, m.shape, m.shard) == (torch.float8_e4m3fn, (4, 8), "model-00001-of-00002.safetensors")
    dtype, shape, shard = r.meta("e.scale")
    assert dtype == torch.float8_e8m0fnu and shape == (2, 3)
    for name, t in src.items():
        got = r.get(name)
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    assert r.config == {"model_type": "deepseek_v3"}
    assert r.total_bytes == sum(t.numel() * t.element_size() for t in src.values())
    fp = r.fingerprint()
    assert fp == CheckpointReader(tmp_path / "ck").fingerprint() and len(fp) == 32


def test_single_file_without_index(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(d / "model.safetensors"))
    r = CheckpointReader(d)
    assert r.names() == ["w"] and torch.equal(r.get("w"), torch.arange(6.0).reshape(2, 3))


def _err(path, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(path, **kw)
    return ei.value


def test_index_missing_names_the_index(tmp_path):
    d = tmp_path / "ck"
    _two_shards(d)
    (d / "model.safetensors.index.json").unlink()
    e = _err(d)
    assert "index missing" in e.msg and e.at.endswith("model.safetensors.index.json") and e.hint


def test_shard_missing_names_the_shard(tmp_path):
    d = tmp_path / "ck"
    _two_shards(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    e = _err(d)
    assert "shard missing" in e.msg and e.at.endswith("model-00002-of-00002.safetensors")


def test_listed_but_absent_names_file_and_tensor(tmp_path):
    d = tmp_path / "ck"
    _two_shards(d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    e = _err(d)
    assert "listed but absent" in e.msg and e.at.endswith("model-00001-of-00002.safetensors:ghost.weight")


def test_present_but_unlisted_names_file_and_tensor(tmp_path):
    d = tmp_path / "ck"
    _two_shards(d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    del idx["weight_map"]["norm.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    e = _err(d)
    assert "present but unlisted" in e.msg and e.at.endswith("model-00002-of-00002.safetensors:norm.weight")
    lax = CheckpointReader(d, strict=False)  # inspect's mode: collect, do not raise
    assert [p.at.split(":")[-1] for p in lax.problems] == ["norm.weight"]


def test_unsupported_dtype_names_file_and_tensor(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    header = json.dumps({"w": {"dtype": "F4", "shape": [2, 2], "data_offsets": [0, 2]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    e = _err(d)
    assert "unsupported dtype F4" in e.msg and e.at.endswith("model.safetensors:w")


def test_truncated_shard_and_unknown_tensor(tmp_path):
    d = tmp_path / "ck"
    _two_shards(d)
    p = d / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-3])
    e = _err(d)
    assert "x.weight" in e.at or "x.weight_scale_inv" in e.at
    r = CheckpointReader(tmp_path / "ck", strict=False)
    with pytest.raises(CheckpointError, match="no tensor named nope"):
        r.meta("nope")


def test_empty_directory(tmp_path):
    e = _err(tmp_path)
    assert "no safetensors checkpoint" in e.msg


def test_reading_threads_that_end_take_their_open_shards_along(tiny_ckpt):
    """Each thread reads through descriptors of its own; a pool's threads that end close theirs (a long-lived
    process that converts or validates again and again does not pile them up), and close() the caller's."""
    import gc
    import os
    from concurrent.futures import ThreadPoolExecutor

    src = tiny_ckpt("deepseek-v3", "fp8")

    def open_here() -> int:
        n = 0
        for f in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{f}").startswith(str(src))
            except OSError:
                pass
        return n

    r = CheckpointReader(src)
    with ThreadPoolExecutor(4) as ex:
        assert all(t is not None for t in ex.map(r.get, r.names()))
    r.get(next(iter(r.names())))
    gc.collect()
    assert open_here() == 1  # this thread's, until close()
    r.close()
    assert open_here() == 0
