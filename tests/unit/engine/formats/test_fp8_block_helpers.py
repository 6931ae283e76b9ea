"""FP8 block-128 cast/dequant vs an independent float64 (numpy) computation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.core.errors import FormatError
from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block, infer_block, scale_grid


def e4m3_round(v: np.ndarray) -> np.ndarray:
    """Round float64 values (|v| <= 448) to the nearest float8_e4m3fn value, ties to even."""
    a = np.abs(v)
    _, e = np.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    ulp = np.where(a >= 2.0**-6, np.ldexp(1.0, e - 4), 2.0**-9)
    return np.sign(v) * np.rint(a / ulp) * ulp


def reference_cast(w32: np.ndarray, block=(128, 128), ue8m0=False):
    o, i = w32.shape
    bo, bi = block
    go, gi = math.ceil(o / bo), math.ceil(i / bi)
    scale = np.ones((go, gi), dtype=np.float64)
    codes = np.zeros((o, i), dtype=np.float64)
    for r in range(go):
        for c in range(gi):
            tile = w32[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi].astype(np.float64)
            amax = np.abs(tile).max()
            if ue8m0:
                k = 0
                if amax > 0:
                    k = math.ceil(math.log2(amax / 448.0))
                    while amax > 448.0 * 2.0**k:
                        k += 1
                    while amax <= 448.0 * 2.0 ** (k - 1):
                        k -= 1
                s = 2.0**k
            else:
                s = float(np.float32(amax / 448.0)) or 1.0
            scale[r, c] = s
            q = (tile / s).astype(np.float32).astype(np.float64)  # fp32 division, correctly rounded
            codes[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] = e4m3_round(np.clip(q, -448, 448))
    return codes, scale


def _check(w: torch.Tensor, block=(128, 128), ue8m0=False):
    q, s = cast_fp8_block(w, block=block, ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == (torch.float8_e8m0fnu if ue8m0 else torch.float32)
    assert tuple(s.shape) == scale_grid(tuple(w.shape), block)
    codes, scale = reference_cast(w.float().numpy(), block, ue8m0)
    np.testing.assert_array_equal(q.float().numpy().astype(np.float64), codes)
    np.testing.assert_array_equal(s.float().numpy().astype(np.float64), scale)
    deq = dequant_fp8_block(q, s, block)
    assert deq.dtype == torch.float32
    expect = codes * np.kron(scale, np.ones(block))[: w.shape[0], : w.shape[1]]
    np.testing.assert_array_equal(deq.numpy().astype(np.float64), expect.astype(np.float32))
    assert torch.isfinite(deq).all()
    return q, s, deq


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape", [(256, 384), (200, 320), (1, 130), (129, 1), (7, 7)])
def test_cast_matches_float64_reference(shape, ue8m0):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1]).unsqueeze(0)
    _check(w.to(torch.bfloat16), ue8m0=ue8m0)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_zero_blocks_and_huge_values(ue8m0):
    w = torch.randn(256, 256)
    w[:128, :128] = 0.0  # all-zero tile: scale 1, exact zeros, no NaN
    w[128:, 128:] *= 1e30  # huge but finite
    w[0, 200] = 3e38
    w[128:, :128] = -0.0  # negative zeros: still an all-zero tile
    q, s, deq = _check(w, ue8m0=ue8m0)
    assert s.float()[0, 0] == 1.0 and s.float()[1, 0] == 1.0
    assert (deq[:128, :128] == 0).all()


def test_tiny_values_and_other_block():
    w = torch.randn(64, 96) * 1e-30
    _check(w, block=(32, 64))
    _check(w, block=(32, 64), ue8m0=True)


def test_ue8m0_exact_power_of_two_edges():
    w = torch.zeros(2, 4)
    w[0, 0] = 448.0  # amax/448 == 1 exactly -> k = 0, code 448 unsaturated
    q, s = cast_fp8_block(w, block=(128, 128), ue8m0=True)
    assert s.float().item() == 1.0 and q.float()[0, 0] == 448.0
    w[0, 0] = 448.0 * 1.0000001
    q, s = cast_fp8_block(w, ue8m0=True)
    assert s.float().item() == 2.0


def test_dequant_accepts_uint8_e8m0_and_rejects_nan_byte():
    q, s = cast_fp8_block(torch.randn(130, 140), ue8m0=True)
    a = dequant_fp8_block(q, s)
    b = dequant_fp8_block(q, s.view(torch.uint8))
    assert torch.equal(a, b)
    bad = s.view(torch.uint8).clone()
    bad[0, 0] = 255
    with pytest.raises(FormatError):
        dequant_fp8_block(q, bad)


@pytest.mark.parametrize("shape, block", [((256, 384), (128, 128)), ((130, 140), (128, 128)), ((256, 96), (128, 32))])
def test_dequant_is_code_times_its_tile_scale_for_whole_and_cut_tiles_and_any_strides(shape, block):
    """Whole tiles go through the in-place tile view, cut edge tiles through the expanded scales: both give
    fp32(code) x fp32(scale) exactly, also for a weight that is a transposed view."""
    q, s = cast_fp8_block(torch.randn(shape), block=block)
    grid = np.repeat(np.repeat(s.numpy(), block[0], 0), block[1], 1)[: shape[0], : shape[1]]
    want = q.float().numpy() * grid
    assert np.array_equal(dequant_fp8_block(q, s, block).numpy(), want)
    qt = q.t().contiguous().t()  # the same values, column-major
    assert not qt.is_contiguous() and torch.equal(dequant_fp8_block(qt, s, block), dequant_fp8_block(q, s, block))


def test_rejects_bad_input():
    with pytest.raises(FormatError):
        cast_fp8_block(torch.randn(10))
    with pytest.raises(FormatError):
        cast_fp8_block(torch.tensor([[1.0, float("inf")]]))
    q, s = cast_fp8_block(torch.randn(130, 140))
    with pytest.raises(FormatError):
        dequant_fp8_block(q, s[:1])
    with pytest.raises(FormatError):
        dequant_fp8_block(q.float(), s)


def test_infer_block():
    assert infer_block((200, 320), (2, 3)) == (128, 128)
    assert infer_block((64, 96), (2, 2)) == (32, 48)
    with pytest.raises(FormatError):
        infer_block((64, 96), (5,))
