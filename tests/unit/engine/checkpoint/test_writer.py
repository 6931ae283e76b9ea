"""Streaming sharded writer: safetensors-identical bytes, atomic .partial handling, resume, disk full."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint import CheckpointReader, CheckpointWriter, ShardFile, TensorSpec, plan_shards, write_checkpoint
from engine.checkpoint.manifest import load_manifest
from engine.core.errors import CheckpointError, DiskFullError


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "l.0.w": torch.randint(0, 255, (16, 8), dtype=torch.uint8, generator=g),
        "l.0.w_scale": torch.rand(16, 1, generator=g).to(torch.float8_e4m3fn),
        "l.0.w_scale_2": torch.tensor(0.25),
        "l.1.w": torch.randn(3, 5, generator=g).bfloat16(),
        "l.1.s": torch.ones(2, 2).to(torch.float8_e8m0fnu),
        "l.1.idx": torch.arange(7, dtype=torch.int64),
        "l.1.empty": torch.zeros(0, 4),
        "l.2.f": torch.randn(9, 3, generator=g).to(torch.float8_e4m3fn),
    }


def _raw(t):
    return t.reshape(-1).view(torch.uint8) if t.numel() else t


def test_header_and_bytes_identical_to_safetensors_save_file(tmp_path):
    t = _tensors()
    out = write_checkpoint(tmp_path / "out", t)
    save_file(t, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    ours = (out / "model-00001-of-00001.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(out / "model-00001-of-00001.safetensors"), framework="pt") as f:
        for k in t:
            assert torch.equal(_raw(f.get_tensor(k)), _raw(t[k]))


def test_out_of_order_writes_sharding_index_and_manifest(tmp_path):
    t = _tensors(1)
    units = [[TensorSpec.of(k, v.dtype, v.shape)] for k, v in sorted(t.items())]
    plans = plan_shards(units, shard_size=100)
    assert len(plans) > 2 and all(p.name.endswith(f"-of-{len(plans):05d}.safetensors") for p in plans)
    w = CheckpointWriter(tmp_path / "out", plans, source_fingerprint="fp", args={"to": "x"})
    for plan in w.prepare():
        sf = w.open_shard(plan)
        for spec in reversed(plan.tensors):  # reverse of file order: hash must still be the file's
            sf.write(spec.name, t[spec.name])
        sf.close()
    assert not (tmp_path / "out").exists() and (tmp_path / "out.partial").is_dir()
    out = w.finalize()
    assert not (tmp_path / "out.partial").exists()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(t)
    man = load_manifest(out)
    assert man["complete"] and man["source_fingerprint"] == "fp" and man["weight_map"] == idx["weight_map"]
    for shard, rec in man["shards"].items():
        assert rec["digest_kind"] == "sha256-pieces" and _pieces_digest((out / shard).read_bytes()) == rec["digest"]
    r = CheckpointReader(out)
    for k, v in t.items():
        assert torch.equal(_raw(r.get(k)), _raw(v))


def _pieces_digest(data: bytes) -> str:
    """sha256 of sha256(header) + sha256(each tensor's bytes) in file order, computed here independently."""
    import hashlib
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    spans = sorted((v["data_offsets"][0], v["data_offsets"][1], k) for k, v in header.items())
    h = hashlib.sha256(hashlib.sha256(data[:base]).digest())
    for a, b, _ in spans:
        h.update(hashlib.sha256(data[base + a:base + b]).digest())
    assert not spans or base + spans[-1][1] == len(data)
    return h.hexdigest()


def test_shard_written_from_threads_has_the_same_bytes_and_digest(tmp_path):
    """Tensors written concurrently from several threads, in any order: same file, same digest; a
    corrupted byte is caught on resume and the shard is redone."""
    from concurrent.futures import ThreadPoolExecutor

    t = {f"w{i}": torch.randn(64, 96 + i, generator=torch.Generator().manual_seed(i)) for i in range(12)}
    t.update({f"s{i}": torch.tensor(float(i)) for i in range(5)})
    units = [[TensorSpec.of(k, v.dtype, v.shape)] for k, v in sorted(t.items())]
    ref = write_checkpoint(tmp_path / "ref", t, shard_size=20_000)
    w = CheckpointWriter(tmp_path / "out", plan_shards(units, 20_000), source_fingerprint="", args={})
    with ThreadPoolExecutor(4) as ex:
        for plan in w.prepare():
            sf = w.open_shard(plan)
            list(ex.map(lambda s, sf=sf: sf.write(s.name, t[s.name]), plan.tensors[::-1]))
            sf.close()
    out = w.finalize()
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (ref / name).read_bytes()
        assert load_manifest(out)["shards"][name]["digest"] == _pieces_digest((out / name).read_bytes())
    # a flipped byte in a finished shard of a partial output: resume redoes that shard only
    partial = tmp_path / "again.partial"
    w2 = CheckpointWriter(tmp_path / "again", plan_shards(units, 20_000), source_fingerprint="", args={})
    for plan in w2.prepare():
        sf = w2.open_shard(plan)
        for s in plan.tensors:
            sf.write(s.name, t[s.name])
        sf.close()
    data = bytearray((partial / shards[0]).read_bytes())
    data[-1] ^= 1
    (partial / shards[0]).write_bytes(bytes(data))
    w3 = CheckpointWriter(tmp_path / "again", plan_shards(units, 20_000), source_fingerprint="", args={})
    assert [p.name for p in w3.prepare()] == [shards[0]] and w3.kept == shards[1:]


def test_write_rejects_unplanned_wrong_shape_and_incomplete(tmp_path):
    plan = plan_shards([[TensorSpec.of("a", torch.float32, (2,))]], 10**9)[0]
    sf = ShardFile(tmp_path, plan)
    with pytest.raises(CheckpointError, match="not planned"):
        sf.write("b", torch.zeros(2))
    with pytest.raises(CheckpointError, match="planned F32"):
        sf.write("a", torch.zeros(3))
    with pytest.raises(CheckpointError, match="unwritten"):
        sf.close()
    sf.abort()
    assert not list(tmp_path.glob("*.partial"))


def _run(dst, t, stop_after=None, args=None):
    units = [[TensorSpec.of(k, v.dtype, v.shape)] for k, v in sorted(t.items())]
    w = CheckpointWriter(dst, plan_shards(units, 120), source_fingerprint="fp", args=args or {"a": 1})
    todo = w.prepare()
    for i, plan in enumerate(todo):
        sf = w.open_shard(plan)
        specs = list(plan.tensors)
        for spec in specs:
            if stop_after is not None and i == stop_after and spec is specs[-1]:
                return w, todo  # "killed" mid-shard: a .partial remains
            sf.write(spec.name, t[spec.name])
        sf.close()
    w.finalize()
    return w, todo


def test_resume_keeps_finished_shards_redoes_rest_byte_identical(tmp_path):
    t = _tensors(2)
    _run(tmp_path / "ref", t)
    w, todo = _run(tmp_path / "out", t, stop_after=2)  # shards 0, 1 finished; 2 killed mid-write
    assert len(todo) == 3 and list((tmp_path / "out.partial").glob("*.partial"))
    # corrupt finished shard 0: it must be redone, not trusted; shard 1 is kept
    first = tmp_path / "out.partial" / todo[0].name
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    w2, todo2 = _run(tmp_path / "out", t)
    assert [p.name for p in todo2] == [todo[0].name, todo[2].name] and w2.kept == [todo[1].name]
    ref = sorted(os.listdir(tmp_path / "ref"))
    assert ref == sorted(os.listdir(tmp_path / "out"))
    for f in ref:
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f


def test_rerun_of_complete_output_is_a_no_op_and_different_args_restart(tmp_path):
    t = _tensors(3)
    _run(tmp_path / "out", t)
    w, todo = _run(tmp_path / "out", t)
    assert w.already_complete and todo == []
    with pytest.raises(CheckpointError, match="already exists"):
        _run(tmp_path / "out", t, args={"a": 2})
    _run(tmp_path / "o2", t, stop_after=1)
    w, todo = _run(tmp_path / "o2", t, args={"a": 2})  # a different job in the .partial: start over
    assert len(todo) == len(w.shards)


def test_disk_full_names_the_file(tmp_path):
    plan = plan_shards([[TensorSpec.of("a", torch.float32, (4,))]], 10**9)[0]
    os.symlink("/dev/full", tmp_path / (plan.name + ".partial"))
    with pytest.raises(DiskFullError) as ei:
        ShardFile(tmp_path, plan)
    assert ei.value.at.endswith(plan.name + ".partial") and "no space left" in ei.value.msg


def test_unwritable_destination_names_the_path_and_touches_nothing(tmp_path, make_unwritable):
    ro = tmp_path / "ro"
    ro.mkdir()
    make_unwritable(ro)
    with pytest.raises(CheckpointError) as ei:
        write_checkpoint(ro / "out", _tensors())
    assert ei.value.at == str(ro / "out.partial") and ei.value.hint and "--dst" in ei.value.hint
    assert "cannot create" in ei.value.msg and ("read-only" in ei.value.msg or "permission denied" in ei.value.msg)
    assert list(ro.iterdir()) == []


def test_unwritable_partial_dir_fails_the_shard_open_naming_the_shard(tmp_path, make_unwritable):
    t = _tensors()
    w = CheckpointWriter(tmp_path / "out", plan_shards([[TensorSpec.of(k, v.dtype, v.shape)] for k, v in t.items()],
                                                       10**9), source_fingerprint="", args={})
    plan = w.prepare()[0]
    make_unwritable(w.partial_dir)
    with pytest.raises(CheckpointError) as ei:
        w.open_shard(plan)
    assert ei.value.at == str(w.partial_dir / (plan.name + ".partial")) and "cannot create" in ei.value.msg


def test_direct_io_and_page_cache_writes_give_the_same_files(tmp_path, monkeypatch):
    """O_DIRECT (aligned middles through a bounce buffer, partial edge blocks assembled in memory, last block
    padded then truncated) and plain page-cache writes: the same bytes, tensors of odd sizes from 4 threads."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(3)
    t = {f"t{i:02d}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8)
         for i, n in enumerate([1, 7, 4095, 4096, 4097, 9000, 3, 70000, 5, 12288, 0, 8191])}
    t["f"] = torch.randn(333, generator=g)
    units = [[TensorSpec.of(k, v.dtype, v.shape)] for k, v in sorted(t.items())]
    outs, modes = [], []
    for flag in ("0", "1"):
        monkeypatch.setenv("QUANTDECK_DIRECT_IO", flag)
        w = CheckpointWriter(tmp_path / f"o{flag}", plan_shards(units, 50_000), source_fingerprint="", args={})
        with ThreadPoolExecutor(4) as ex:
            for plan in w.prepare():
                sf = w.open_shard(plan)
                modes.append(sf._direct is not None)
                list(ex.map(lambda s, sf=sf: sf.write(s.name, t[s.name]), plan.tensors))
                sf.close()
        outs.append(w.finalize())
    assert not any(modes[: len(modes) // 2])  # QUANTDECK_DIRECT_IO=0: page cache
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), n
    r = CheckpointReader(outs[1])
    for k, v in t.items():
        assert torch.equal(_raw(r.get(k)), _raw(v))


def test_durable_mode_fsyncs_each_shard_and_the_default_writes_the_same_files_without(tmp_path, monkeypatch):
    """By default shards go through the page cache without fsync (as `cp` writes); QUANTDECK_FSYNC=1 fsyncs
    each before the manifest records it. The same bytes either way; the manifest says which (`synced`).
    HostArray tensors are written like torch ones."""
    import numpy as np

    from engine.checkpoint.host import HostArray

    tensors = _tensors()
    host = {k: HostArray.from_bytes(TensorSpec.of(k, v.dtype, v.shape).dtype, tuple(v.shape),
                                    _raw(v).numpy() if v.numel() else np.zeros(0, np.uint8))
            for k, v in tensors.items()}
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    monkeypatch.setenv("QUANTDECK_FSYNC", "1")
    a = write_checkpoint(tmp_path / "synced", tensors, shard_size=200)
    synced = [c for c in calls if c.endswith(".safetensors.partial")]
    calls.clear()
    monkeypatch.delenv("QUANTDECK_FSYNC")
    b = write_checkpoint(tmp_path / "not-synced", host, shard_size=200)
    assert len(synced) >= 2 and not [c for c in calls if c.endswith(".safetensors.partial")]
    for p in sorted(a.iterdir()):
        if p.name != "manifest.json":
            assert (b / p.name).read_bytes() == p.read_bytes(), p.name
    ma, mb = load_manifest(a)["shards"], load_manifest(b)["shards"]
    assert {r["synced"] for r in ma.values()} == {True} and {r["synced"] for r in mb.values()} == {False}
    assert {n: {k: v for k, v in r.items() if k != "synced"} for n, r in ma.items()} == \
        {n: {k: v for k, v in r.items() if k != "synced"} for n, r in mb.items()}


def test_a_finished_output_written_without_fsync_is_checked_on_a_rerun_and_a_torn_shard_rewritten(tmp_path):
    """The machine went down before the page cache reached the disk: a shard of the finished output no longer
    matches its digest. The same command finds it, moves the output back to `.partial`, writes that shard
    again and ends with the bytes of the first run; an intact output is fsynced once and recorded as synced."""
    tensors = _tensors()
    out = write_checkpoint(tmp_path / "o", tensors, shard_size=200)
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    write_checkpoint(tmp_path / "o", tensors, shard_size=200)  # intact: checked, fsynced, now synced
    assert {r["synced"] for r in load_manifest(out)["shards"].values()} == {True}
    m = load_manifest(out)
    torn = sorted(m["shards"])[1]
    for rec in m["shards"].values():
        rec["synced"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    data = bytearray((out / torn).read_bytes())
    data[-1] ^= 0xFF  # what a lost page looks like to the digest
    (out / torn).write_bytes(bytes(data))
    write_checkpoint(tmp_path / "o", tensors, shard_size=200)
    assert not (tmp_path / "o.partial").exists() and load_manifest(out)["complete"]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"} == first


def test_a_finished_unsynced_output_on_a_read_only_filesystem_is_still_complete(tmp_path, make_unwritable):
    """The rerun checks the digests and would record the shards as synced; where the output cannot be written
    it says `already complete` all the same, and leaves no lock file behind."""
    tensors = _tensors()
    out = write_checkpoint(tmp_path / "o", tensors, shard_size=200)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    make_unwritable(out)
    write_checkpoint(tmp_path / "o", tensors, shard_size=200)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_torn_finished_output_beside_a_partial_dir_is_refused_naming_both(tmp_path):
    from engine.core.errors import CheckpointError

    tensors = _tensors()
    out = write_checkpoint(tmp_path / "o", tensors, shard_size=200)
    m = load_manifest(out)
    torn = sorted(m["shards"])[0]
    data = bytearray((out / torn).read_bytes())
    data[-1] ^= 0xFF
    (out / torn).write_bytes(bytes(data))
    (tmp_path / "o.partial").mkdir()
    with pytest.raises(CheckpointError, match="o.partial exists too"):
        write_checkpoint(tmp_path / "o", tensors, shard_size=200)
    assert load_manifest(out)["complete"] and (out / torn).read_bytes() == bytes(data)  # nothing touched
