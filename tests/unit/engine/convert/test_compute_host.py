"""The torch-free CPU math (engine.convert.compute_host) gives the bytes of the torch path (engine.convert.compute)
on every item of real tiny DeepSeek plans and on odd hand-made items, in both output layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointReader
from engine.checkpoint.host import HostArray
from engine.checkpoint.safetensors_format import TensorSpec, dtype_name
from engine.convert import compute_host
from engine.convert.compute import compute_item as torch_compute
from engine.convert.plan import COPY, FLOAT, FP8, TO_BF16, TO_NVFP4, Item, Member, build_plan
from engine.core.errors import FormatError
from engine.formats.fp8_block import host as fb
from engine.formats.fp8_block.helpers import cast_fp8_block, scale_to_fp32
from engine.formats.layout import Layout
from engine.formats.nvfp4 import host as nv
from engine.models import detect_layout


@pytest.fixture(autouse=True)
def _both_kernels(cpu_kernels):
    """Every check here runs with the C kernels and with the numba ones (tests/conftest.py)."""
    yield cpu_kernels


def _host(t: torch.Tensor) -> HostArray:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return HostArray.from_bytes(dtype_name(t.dtype), tuple(t.shape), raw)


def _bytes(t) -> bytes:
    if isinstance(t, HostArray):
        return t.raw().tobytes()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _dtype(t) -> str:
    return t.dtype if isinstance(t, HostArray) else dtype_name(t.dtype)


def _same_results(item: Item, src: dict[str, torch.Tensor], v4: bool = False) -> None:
    want = torch_compute(item, src, "cpu", v4_fp8=v4)
    for item_parallel in (False, True):  # the parallel kernels, then their serial twins on this thread
        _same_result(item, want, compute_host.compute_item(item, {k: _host(v) for k, v in src.items()}, v4_fp8=v4,
                                                           item_parallel=item_parallel))


def _same_result(item: Item, want, got) -> None:
    assert set(got.tensors) == set(want.tensors), item.key
    assert got.notes == want.notes
    for layout in ("modelopt", "compressed-tensors"):
        for name in want.tensors:
            wn, wt = Layout.get(layout).out_tensor(name, want.tensors[name], item.action == TO_NVFP4)
            gn, gt = Layout.get(layout).out_tensor(name, got.tensors[name], item.action == TO_NVFP4)
            assert (gn, _dtype(gt), tuple(gt.shape)) == (wn, _dtype(wt), tuple(wt.shape)), (layout, name)
            assert _bytes(gt) == _bytes(wt), (layout, name)


@pytest.mark.parametrize("family,dtype,qattn", [("deepseek-v3", "fp8", False), ("deepseek-v3", "fp8", True),
                                                ("deepseek-v4", "fp8", False), ("deepseek-v3", "bf16", True)])
def test_every_item_of_a_tiny_plan_matches_the_torch_path(tiny_ckpt, family, dtype, qattn):
    src = tiny_ckpt(family, dtype, mtp=True, hidden=320)
    r = CheckpointReader(src)
    plan = build_plan(r, detect_layout(r.config, r.names()), "nvfp4", quantize_attention=qattn)
    kinds = set()
    for item in plan.items:
        names = [n for m in item.members for n in ((m.name, m.scale) if m.scale else (m.name,))]
        _same_results(item, {n: r.get(n) for n in names}, v4=family == "deepseek-v4")
        kinds.add((item.action, compute_host.native(item), len(item.members)))
    assert ("nvfp4", True, 2) in kinds and ("copy", True, 1) in kinds  # fused groups and preserved tensors
    if family == "deepseek-v4":
        assert any(not native for _, native, _ in kinds)  # MXFP4 experts go through torch


def _item(*members: Member) -> Item:
    return Item(TO_NVFP4, tuple(members), (), 0)


def _fp8_member(name: str, shape, enc=FP8, scale=True) -> Member:
    return Member(name + ".weight", name + ".weight_scale_inv" if scale else None, enc, tuple(shape), name)


@pytest.mark.parametrize("shape,block", [((130, 200), (128, 128)), ((7, 33), (128, 128)), ((256, 384), (64, 128))])
def test_fp8_groups_with_partial_blocks_zero_blocks_and_huge_scales(shape, block):
    g = torch.Generator().manual_seed(sum(shape))
    a = torch.randn(shape, generator=g) * 3
    a[:, : min(40, shape[1])] = 0  # whole zero 16-blocks
    b = torch.randn(shape, generator=g) * 1e30  # huge values: huge block scales
    src = {}
    for name, w in (("gate", a), ("up", b)):
        q, s = cast_fp8_block(w, block=block)
        src[name + ".weight"], src[name + ".weight_scale_inv"] = q, s
    _same_results(_item(_fp8_member("gate", shape), _fp8_member("up", shape)), src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_float_members_zero_tensors_and_ties(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(24, 50, generator=g) * 4).to(dtype)
    ties = (torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 6 + [-0.25, 6.0]).reshape(1, 50)).to(dtype)
    zero = torch.zeros(9, 50, dtype=dtype)
    src = {"a.weight": w, "b.weight": ties, "z.weight": zero}
    for n, t in src.items():
        _same_results(_item(Member(n, None, FLOAT, tuple(t.shape), n[:-7])), {n: t})
    _same_results(_item(Member("a.weight", None, FLOAT, (24, 50), "a"), Member("b.weight", None, FLOAT, (1, 50), "b")),
                  {"a.weight": w, "b.weight": ties})


def test_fp8_codes_without_a_scale_and_e8m0_scales():
    q, _ = cast_fp8_block(torch.randn(32, 48))
    _same_results(_item(_fp8_member("m", (32, 48), scale=False)), {"m.weight": q})
    q, s = cast_fp8_block(torch.randn(200, 300) * 5, ue8m0=True)
    assert s.dtype == torch.float8_e8m0fnu
    _same_results(_item(_fp8_member("v4", (200, 300))), {"v4.weight": q, "v4.weight_scale_inv": s})


def test_e4m3_table_and_scale_decoding_equal_torch():
    want = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(nv.E4M3_LUT, want)  # NaN where torch has NaN
    e8 = torch.arange(255, dtype=torch.int32).to(torch.uint8)
    for t, name in ((e8.view(torch.float8_e8m0fnu), "F8_E8M0"), (e8, "U8"),
                    (torch.randn(5, 7).abs().to(torch.bfloat16), "BF16"),
                    (torch.randn(5, 7).abs().half(), "F16"), (torch.randn(5, 7).abs(), "F32")):
        got = fb.block_scales_fp32(_host(t).data, name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, scale_to_fp32(t).numpy())
    with pytest.raises(FormatError, match="NaN byte 0xFF"):
        fb.block_scales_fp32(np.array([[255]], np.uint8), "F8_E8M0")
    with pytest.raises(FormatError, match="negative"):
        fb.block_scales_fp32(np.array([[-1.0]], np.float32), "F32")


def test_corrupt_sources_are_named():
    w = torch.randn(16, 32)
    w[3, 5] = float("inf")
    with pytest.raises(FormatError, match="bad.weight holds inf or NaN"):
        compute_host.compute_item(_item(Member("bad.weight", None, FLOAT, (16, 32), "bad")),
                                  {"bad.weight": _host(w)})
    q, s = cast_fp8_block(torch.randn(16, 32))
    raw = q.view(torch.uint8).clone()
    raw[0, 0] = 0x7F  # an E4M3 NaN code
    with pytest.raises(FormatError, match="NaN codes"):
        compute_host.compute_item(_item(_fp8_member("n", (16, 32))),
                                  {"n.weight": _host(raw.view(torch.float8_e4m3fn)), "n.weight_scale_inv": _host(s)})
    with pytest.raises(FormatError, match="does not match weight"):
        nv.fp8_block_to_nvfp4(np.zeros((16, 32), np.uint8), np.ones((2, 2), np.float32), (128, 128), 1.0)


def test_host_array_round_trips_through_torch():
    t = torch.randn(3, 5).to(torch.bfloat16)
    h = _host(t)
    assert (h.dtype, h.shape, h.nbytes) == ("BF16", (3, 5), 30)
    assert torch.equal(h.torch(), t)
    with pytest.raises(TypeError, match="F32 is stored as float32"):
        HostArray.of("F32", np.zeros(3, np.float16))


@pytest.mark.parametrize("corrupt", ["nan-code", "inf-scale", "negative-scale"])
@pytest.mark.parametrize("action", [TO_BF16, COPY, TO_NVFP4])
def test_both_paths_refuse_a_corrupt_fp8_weight_and_name_it(corrupt, action):
    """Kept in BF16 (attention), kept as FP8 (the FP8-block target copies it) or quantized: both paths refuse a
    NaN code or a bad block scale, and the error names the tensor, not the function that found it."""
    q, s = cast_fp8_block(torch.randn(16, 32))
    raw, s = q.view(torch.uint8).clone(), s.clone()
    if corrupt == "nan-code":
        raw[2, 3] = 0xFF
    else:
        s[0, 0] = float("inf") if corrupt == "inf-scale" else -1.0
    w = raw.view(torch.float8_e4m3fn)
    m = _fp8_member("model.layers.0.self_attn.kv_a_proj_with_mqa", (16, 32))
    outs = ()
    if action == COPY:
        outs = (TensorSpec(m.name, "F8_E4M3", (16, 32)), TensorSpec(m.scale, "F32", tuple(s.shape)))
    item = Item(action, (m,), outs, 0)
    src = {m.name: w, m.scale: s}
    with pytest.raises(FormatError, match="kv_a_proj_with_mqa"):
        torch_compute(item, src, "cpu")
    with pytest.raises(FormatError, match="kv_a_proj_with_mqa"):
        compute_host.compute_item(item, {k: _host(v) for k, v in src.items()})


def test_item_parallel_runs_small_items_on_the_serial_kernels_and_big_ones_over_every_core(monkeypatch):
    from engine.formats import cpu_kernels, kernel_mode

    seen = []

    def spy_on(real):
        def spy(*args):
            seen.append(kernel_mode.serial())
            real(*args)

        return spy

    for name in ("fp8_tile_max", "fp8_block_to_nvfp4"):
        monkeypatch.setattr(cpu_kernels, name, spy_on(getattr(cpu_kernels, name)))
    q, s = cast_fp8_block(torch.randn(130, 200), block=(128, 128))
    src = {"w.weight": _host(q), "w.weight_scale_inv": _host(s)}
    item = _item(_fp8_member("w", q.shape))
    for item_parallel, limit, want in ((False, 1 << 30, False), (True, 1 << 30, True), (True, 100, False)):
        monkeypatch.setattr(compute_host, "SERIAL_MAX_BYTES", limit)
        seen.clear()
        a = compute_host.compute_item(item, src, item_parallel=item_parallel)
        assert seen == [want, want], (item_parallel, limit)  # the amax pass and the quantization
        assert not kernel_mode.serial()  # the mode ends with the item
        b = compute_host.compute_item(item, src)
        assert all(_bytes(a.tensors[k]) == _bytes(b.tensors[k]) for k in b.tensors)


def test_a_fused_member_dwarfed_by_its_partner_is_named_in_a_note_by_both_paths():
    """gate holds one 1e30: up, 30 orders of magnitude smaller, shares its weight_scale_2 and rounds to 0."""
    gate, up = torch.randn(16, 32), torch.randn(16, 32) * 0.02
    gate[0, 0] = 1e30
    src = {"g.weight": gate.to(torch.bfloat16), "u.weight": up.to(torch.bfloat16)}
    item = _item(Member("g.weight", None, FLOAT, (16, 32), "g"), Member("u.weight", None, FLOAT, (16, 32), "u"))
    want = torch_compute(item, src, "cpu")
    got = compute_host.compute_item(item, {k: _host(v) for k, v in src.items()})
    assert got.notes == want.notes and len(got.notes) == 1 and got.notes[0].startswith("u.weight: max")
    calm = {"g.weight": up.to(torch.bfloat16), "u.weight": up.to(torch.bfloat16)}
    assert compute_host.compute_item(item, {k: _host(v) for k, v in calm.items()}).notes == []


def test_workspace_counts_the_float32_copies_of_members_that_are_not_fp8_with_a_scale():
    """One compute thread per core: the in-flight budget (engine.convert.pipeline) counts what an item's math
    holds beyond its inputs, or BF16 sources would hold several times the budget."""
    bf = _item(Member("a.weight", None, FLOAT, (16, 32), "a"), Member("b.weight", None, FLOAT, (16, 32), "b"))
    f8 = _item(_fp8_member("c", (16, 32)))
    assert compute_host.workspace_bytes(bf) == 2 * (2 * 4 * 16 * 32)
    assert compute_host.workspace_bytes(f8) == 0
    assert compute_host.workspace_bytes(_item(_fp8_member("d", (16, 32), scale=False))) == 2 * 4 * 16 * 32
