"""The layer reader (plan, parallel reads, device assembly) builds every layer byte for byte as the reference:
each stored tensor read on its own, dequantized on the host (dequant_fp8_block / dequant_mxfp4), experts
stacked with torch.stack / torch.cat, then cast — kept here, in `reference_layer`, as the contract."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.calibrate.family import LayerFamily
from engine.calibrate.layer import compute_dtype, keep_fp32
from engine.calibrate.layer_assemble import STAGING_BYTES
from engine.calibrate.layer_plan import MERGE_GAP, coalesce
from engine.calibrate.layer_reader import READ_THREADS, WARM_CHUNK, LayerReader
from engine.checkpoint.reader import CheckpointReader, TensorMeta
from engine.core.errors import CheckpointError
from tests.fixtures_ckpt import copy_ckpt

REPO = Path(__file__).resolve().parents[4]
SOURCES = {  # name -> build_fixture arguments
    "v3-bf16": dict(family="deepseek-v3", dtype="bf16"),
    "v3-fp8": dict(family="deepseek-v3", dtype="fp8", mtp=True),
    "v3-fp8-partial-tiles": dict(family="deepseek-v3", dtype="fp8", hidden=320, moe_inter=80),
    "v4-fp8-mxfp4": dict(family="deepseek-v4", dtype="fp8", layers=3),
    "v4-fp8-experts": dict(family="deepseek-v4", dtype="fp8", v4_experts="fp8"),
}


# -- the reference: the host path the reader replaced --------------------------------------------------------
def _ref_get(reader: CheckpointReader, names: set[str], name: str) -> torch.Tensor:
    from engine.formats.fp8_block.helpers import dequant_fp8_block, infer_block
    from engine.formats.mxfp4.helpers import dequant_mxfp4

    t = reader.get(name)
    base = name[: -len("weight")] if name.endswith("weight") else name + "."
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        s = reader.get(next(n for n in (base + "weight_scale_inv", base + "scale") if n in names))
        return dequant_fp8_block(t, s, infer_block(tuple(t.shape), tuple(s.shape)))
    if t.dtype in (torch.uint8, torch.int8) and name.endswith(".weight") and base + "scale" in names:
        return dequant_mxfp4(t, reader.get(base + "scale"))
    return t


def _ref_param(family, i: int, pname: str, get, names: set[str]) -> torch.Tensor:
    plain, experts = family.source_map(i, names)
    if pname in plain:
        return get(plain[pname])
    m = re.match(r"^(.*experts)\.(gate_up_proj|down_proj)$", pname)
    n = 1 + max(e for e, _ in experts)
    if m.group(2) == "down_proj":
        return torch.stack([get(experts[(e, "down")]) for e in range(n)])
    return torch.stack([torch.cat([get(experts[(e, "gate")]), get(experts[(e, "up")])], dim=0) for e in range(n)])


def reference_layer(family, hf_config, i: int, reader: CheckpointReader, dtype: torch.dtype) -> dict:
    names = set(reader.names())
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in family.layer_class()(hf_config, i).state_dict().items()}
    keep = keep_fp32(family, dtype)
    out = {}
    for pname, (shape, cur) in shapes.items():
        t = _ref_param(family, i, pname, lambda n: _ref_get(reader, names, n), names)
        assert tuple(t.shape) == shape
        want = torch.float32 if any(k in pname for k in keep) else (dtype if cur.is_floating_point else cur)
        out[pname] = t.to(want).contiguous()
    return out


# -- helpers ---------------------------------------------------------------------------------------------------
def _setup(path: Path):
    reader = CheckpointReader(path)
    family = LayerFamily.for_config(reader.config)
    hf_config = family.hf_config(reader.config)
    return reader, family, hf_config, compute_dtype(reader.config), family.num_layers(hf_config)


def assert_same_layer(ref: dict, got: dict) -> None:
    assert set(ref) == set(got)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k


def build_all(path: Path, direct: bool | None = None, device: str = "cpu") -> tuple[list[dict], LayerReader]:
    """Every layer through the reader, in streaming order (read i+1 after assembling i); back on the host."""
    reader, family, hf_config, dtype, n = _setup(path)
    lr = LayerReader(reader, family, hf_config, dtype, torch.device(device), range(n), direct=direct)
    try:
        return [{k: v.cpu() for k, v in lr.assemble(lr.read(i)).items()} for i in range(n)], lr
    finally:
        lr.close()


# -- equality -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direct", [None, False], ids=["host-direct", "buffered"])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_every_layer_is_byte_identical_to_the_reference(tiny_ckpt, source, direct):
    path = tiny_ckpt(**SOURCES[source])
    layers, lr = build_all(path, direct)
    reader, family, hf_config, dtype, n = _setup(path)
    for i in range(n):
        assert_same_layer(reference_layer(family, hf_config, i, reader, dtype), layers[i])
    assert lr.bytes_read >= lr.source_bytes > 0


@pytest.mark.parametrize("kernels", ["c", "numba"])
def test_fp8_pieces_decode_alike_with_and_without_the_c_kernels(tiny_ckpt, monkeypatch, kernels):
    """On a CPU, FP8-block pieces of BF16 parameters are decoded by the C kernel where it builds, by torch
    where not (QUANTDECK_KERNELS=numba): the same bytes either way, partial tiles included."""
    from engine.calibrate.layer_assemble import host_kernels

    monkeypatch.setenv("QUANTDECK_KERNELS", kernels)
    assert (host_kernels() is not None) == (kernels == "c")  # the path asked for is the one taken
    path = tiny_ckpt(**SOURCES["v3-fp8-partial-tiles"])
    layers, _ = build_all(path)
    reader, family, hf_config, dtype, n = _setup(path)
    assert dtype == torch.bfloat16
    for i in range(n):
        assert_same_layer(reference_layer(family, hf_config, i, reader, dtype), layers[i])


@pytest.mark.requires_gpu
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_layers_assembled_on_the_gpu_are_byte_identical(tiny_ckpt, source):
    """Page-locked buffer, asynchronous upload and GPU dequantization give the host reference's bytes."""
    path = tiny_ckpt(**SOURCES[source])
    layers, lr = build_all(path, device="cuda")
    reader, family, hf_config, dtype, n = _setup(path)
    for i in range(n):
        assert_same_layer(reference_layer(family, hf_config, i, reader, dtype), layers[i])


def build_streamed(path: Path, device: str = "cpu", window: int = 3) -> tuple[list[dict], list[dict]]:
    """Every layer through a reader whose budget streams the experts: (the state dicts with each streamed
    parameter decoded whole from its store, window by window; the stores' stored and placeholder bytes)."""
    reader, family, hf_config, dtype, n = _setup(path)
    lr = LayerReader(reader, family, hf_config, dtype, torch.device(device), range(n), budget=0)
    layers, sizes = [], []
    try:
        for i in range(n):
            raw = lr.read(i)
            params = lr.assemble(raw)
            size = {"stored": 0, "placeholders": 0, "resident": 0}
            for module, store in raw.stores.items():
                store.window = window
                for name, (shape, dt) in store.params.items():
                    full = f"{module}.{name}"
                    ph = params[full]
                    assert ph.shape == shape and ph.dtype == dt and set(ph.stride()) == {0}
                    size["placeholders"] += ph.untyped_storage().nbytes()
                    size["resident"] += torch.empty(shape, dtype=dt, device="meta").nbytes
                    params[full] = torch.stack([w.clone() for _, w in store.weights(name)])
                size["stored"] += store.nbytes
            layers.append({k: v.cpu() for k, v in params.items()})
            sizes.append(size)
    finally:
        lr.close()
    return layers, sizes


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_streamed_experts_decode_byte_identical_to_the_reference(tiny_ckpt, source, monkeypatch):
    """A layer over the device budget keeps its experts as stored: decoded a window at a time (3 of 4 experts:
    a window ends inside the layer), every expert weight has the reference's bytes. (BF16 experts of a BF16
    model would not shrink, so they stream only here, to check the plain decode.)"""
    from engine.calibrate import expert_store

    path = tiny_ckpt(**SOURCES[source])
    monkeypatch.setattr(expert_store, "MAX_STORED_FRACTION", 2.0)
    layers, sizes = build_streamed(path)
    reader, family, hf_config, dtype, n = _setup(path)
    for i in range(n):
        assert_same_layer(reference_layer(family, hf_config, i, reader, dtype), layers[i])
    moe = [s for s in sizes if s["resident"]]
    assert moe, "no layer streamed its experts"
    for s in moe:
        assert s["placeholders"] <= 2 * 4  # one element each
        if not source.startswith("v3-bf16"):  # FP8 / MXFP4 kept as stored: smaller than the BF16 experts
            assert s["stored"] < 0.7 * s["resident"]


@pytest.mark.requires_gpu
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_streamed_experts_decode_byte_identical_on_the_gpu(tiny_ckpt, source, monkeypatch):
    from engine.calibrate import expert_store

    path = tiny_ckpt(**SOURCES[source])
    monkeypatch.setattr(expert_store, "MAX_STORED_FRACTION", 2.0)
    layers, _ = build_streamed(path, device="cuda")
    reader, family, hf_config, dtype, n = _setup(path)
    for i in range(n):
        assert_same_layer(reference_layer(family, hf_config, i, reader, dtype), layers[i])


def test_plan_encodings_and_file_order(tiny_ckpt):
    reader, family, hf_config, dtype, n = _setup(tiny_ckpt(**SOURCES["v4-fp8-mxfp4"]))
    lr = LayerReader(reader, family, hf_config, dtype, torch.device("cpu"), range(n), direct=False)
    plan = lr.plan(1)
    lr.close()
    enc = {p.source.encoding.value for p in plan.pieces}
    assert enc == {"plain", "fp8-block", "mxfp4"}
    keys = [(r.shard, r.start) for r in plan.ranges]
    assert keys == sorted(keys) and len(plan.ranges) <= len(reader.shards())  # one range per shard here
    for r in plan.ranges:  # alignment kept: buffer offset ≡ file offset (mod 64)
        assert (r.offset - r.start) % 64 == 0
    assert plan.nbytes >= plan.source_bytes


def test_coalesce_merges_small_gaps_only():
    metas = [TensorMeta("a", "U8", (10,), "s1", 100, 110), TensorMeta("b", "U8", (10,), "s1", 120, 130),
             TensorMeta("c", "U8", (10,), "s1", 130 + MERGE_GAP + 1, 140 + MERGE_GAP + 1),
             TensorMeta("d", "U8", (4,), "s0", 7, 11)]
    ranges, offsets, nbytes = coalesce(metas)
    assert [(r.shard, r.start, r.end) for r in ranges] == [("s0", 7, 11), ("s1", 100, 130),
                                                          ("s1", 130 + MERGE_GAP + 1, 140 + MERGE_GAP + 1)]
    assert offsets["b"] - offsets["a"] == 20 and all(offsets[m.name] % 64 == m.start % 64 for m in metas)
    assert nbytes == ranges[-1].offset + 10


# -- errors ---------------------------------------------------------------------------------------------------
def test_missing_scale_names_the_tensor_and_file(tiny_ckpt):
    reader, family, hf_config, dtype, n = _setup(tiny_ckpt(**SOURCES["v3-fp8"]))
    name = "model.layers.1.self_attn.o_proj.weight"
    lr = LayerReader(reader, family, hf_config, dtype, torch.device("cpu"), range(n))
    lr.names.discard(name + "_scale_inv")  # as a checkpoint without it lists its tensors
    with pytest.raises(CheckpointError) as e:
        lr.plan(1)
    lr.close()
    assert name in str(e.value) and reader.meta(name).shard in e.value.at


def test_truncated_shard_names_the_file(tiny_ckpt, tmp_path):
    path = copy_ckpt(tiny_ckpt(**SOURCES["v3-fp8"]), tmp_path)
    reader, family, hf_config, dtype, n = _setup(path)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    m = reader.meta(name)
    os.truncate(path / m.shard, m.start + 5)  # after the headers were read: the data ends early
    lr = LayerReader(reader, family, hf_config, dtype, torch.device("cpu"), range(n), direct=False)
    with pytest.raises(CheckpointError) as e:
        lr.read(1)
    lr.close()
    assert m.shard in e.value.at and "ended early" in str(e.value)


def test_shape_mismatch_names_the_tensor(tiny_ckpt):
    reader, family, _, dtype, n = _setup(tiny_ckpt(**SOURCES["v3-bf16"]))
    cfg = dict(reader.config, moe_intermediate_size=reader.config["moe_intermediate_size"] * 2)
    lr = LayerReader(reader, family, family.hf_config(cfg), dtype, torch.device("cpu"), range(0))
    with pytest.raises(CheckpointError) as e:
        lr.plan(1)
    lr.close()
    assert "experts" in str(e.value) and ".safetensors:" in e.value.at


# -- shared reads ---------------------------------------------------------------------------------------------
SHARED = """
import hashlib, json, os, sys, torch, torch.distributed as dist
from engine.calibrate.dist import init_distributed
from engine.calibrate.layer_reader import LayerReader, ReadShare
from tests.unit.engine.calibrate.test_layer_reader import _setup
ctx = init_distributed("cpu")
reader, family, hf_config, dtype, n = _setup(sys.argv[1])
lr = LayerReader(reader, family, hf_config, dtype, torch.device("cpu"), range(n))
lr.share_reads(ReadShare.for_node(ctx))
digests, planned = [], 0
for i in range(n):
    raw = lr.read(i)
    planned += sum(r.nbytes for r in raw.plan.ranges)
    layer = lr.assemble(raw)
    digests.append({k: hashlib.sha256(v.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                    for k, v in layer.items()})
lr.close()
out = {"rank": ctx.rank, "bytes_read": lr.bytes_read, "planned": planned, "digests": digests}
with open(os.path.join(sys.argv[2], f"rank{ctx.rank}.json"), "w") as f:
    json.dump(out, f)
ctx.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 3])
def test_shared_reads_split_the_bytes_and_give_the_same_layers(tiny_ckpt, tmp_path, ranks):
    path = tiny_ckpt(**SOURCES["v4-fp8-mxfp4"])
    script = tmp_path / "shared.py"
    script.write_text(SHARED)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
           str(29640 + ranks), str(script), str(path), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(ranks)]
    reader, family, hf_config, dtype, n = _setup(path)
    for i in range(n):
        ref = reference_layer(family, hf_config, i, reader, dtype)
        want = {k: hashlib.sha256(v.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in ref.items()}
        assert all(g["digests"][i] == want for g in got), f"layer {i}"
    planned = got[0]["planned"]  # the bytes of every layer's read ranges
    assert sum(g["bytes_read"] for g in got) == planned  # each byte read once, by one rank
    for g in got:  # about 1/R each (the split is of the buffer, alignment padding included)
        assert abs(g["bytes_read"] - planned / ranks) <= 0.02 * planned, (g["bytes_read"], planned)


# -- host memory ----------------------------------------------------------------------------------------------
RSS = """
import gc, json, resource, sys, torch
from engine.calibrate import layer_reader
from engine.calibrate.layer_reader import LayerReader
from tests.unit.engine.calibrate.test_layer_reader import _setup
layer_reader.WINDOW_BYTES = int(sys.argv[2])
reader, family, hf_config, dtype, n = _setup(sys.argv[1])
lr = LayerReader(reader, family, hf_config, dtype, torch.device("cpu"), range(n))
with torch.device("meta"):
    family.layer_class()(hf_config, n - 1)  # warm the imports the build uses
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
layer = lr.assemble(lr.read(n - 2))  # streaming order: the next layer is read while this one lives
raw = lr.read(n - 1)
del layer
gc.collect()
layer = lr.assemble(raw)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
bf16 = sum(v.numel() * 2 for v in layer.values())
print(json.dumps({"base": base, "peak": peak, "layer_bf16": bf16}))
"""


@pytest.mark.slow
def test_host_build_peak_rss_is_bounded(tiny_ckpt, tmp_path):
    path = tiny_ckpt("deepseek-v3", "fp8", layers=3, experts=96, hidden=768, moe_inter=512)
    script = tmp_path / "rss.py"
    script.write_text(RSS)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    window = 2 << 20
    r = subprocess.run([sys.executable, str(script), str(path), str(window)], env=env, capture_output=True,
                       text=True, timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["layer_bf16"] > 200e6
    # one layer's BF16 parameters, a read window and the warming reads' buffers, the staging of one run of experts
    # and some slack; not the next layer's stored FP8 bytes (half of the BF16: over 100 MB here) beside them
    assert m["peak"] - m["base"] <= (m["layer_bf16"] + window + READ_THREADS * WARM_CHUNK + STAGING_BYTES["cpu"]
                                     + (32 << 20)), m


@pytest.mark.parametrize("window", [1, 200_000, None], ids=["piece-by-piece", "small", "default"])
@pytest.mark.parametrize("source", ["v3-fp8-partial-tiles", "v4-fp8-mxfp4", "v3-bf16"])
def test_a_host_build_window_by_window_is_byte_identical(tiny_ckpt, monkeypatch, source, window):
    """On a host without shared reads, a layer is read into the page cache ahead and built window by window
    (assemble_in_windows): whatever the window, every layer is the reference's."""
    from engine.calibrate import layer_assemble, layer_reader

    if window is not None:
        monkeypatch.setattr(layer_reader, "WINDOW_BYTES", window)
    seen: list[int] = []
    windows = layer_assemble._windows
    monkeypatch.setattr(layer_assemble, "_windows", lambda plan, w: seen.append(len(got := windows(plan, w))) or got)
    path = tiny_ckpt(**SOURCES[source])
    layers, lr = build_all(path)
    reader, family, hf_config, dtype, n = _setup(path)
    for i in range(n):
        assert_same_layer(reference_layer(family, hf_config, i, reader, dtype), layers[i])
    assert len(seen) == n
    if window == 1:  # a window per piece
        assert seen == [sum(not p.direct for p in lr.plan(i).pieces) for i in range(n)]


def test_windows_keep_the_plans_order_and_size(tiny_ckpt):
    from engine.calibrate.layer_assemble import _stored, _windows

    reader, family, hf_config, dtype, n = _setup(tiny_ckpt(**SOURCES["v3-fp8"]))
    lr = LayerReader(reader, family, hf_config, dtype, torch.device("cpu"), range(n))
    plan = lr.plan(n - 1)
    lr.close()
    sizes = [sum(m.nbytes for m in _stored(p)) for p in plan.pieces if not p.direct]
    w = max(sizes) * 3
    groups = _windows(plan, w)
    assert [p for g in groups for p in g] == [p for p in plan.pieces if not p.direct]
    assert all(sum(m.nbytes for p in g for m in _stored(p)) <= w for g in groups) and len(groups) > 1
