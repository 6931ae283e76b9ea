"""MXFP4 quantize/dequant vs a float64 reference and transformers' MXFP4 unpacking; MXFP4 -> NVFP4."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.core.errors import FormatError
from engine.formats.mxfp4.helpers import dequant_mxfp4, mxfp4_to_nvfp4, quantize_mxfp4
from engine.formats.nvfp4.helpers import dequant_nvfp4, global_scale, quantize_nvfp4

GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_round(v: float) -> float:
    """Nearest E2M1 magnitude, ties to the even grid index, saturating at 6 (sign kept)."""
    a = min(abs(v), 6.0)
    d = np.abs(GRID - a)
    best = np.flatnonzero(d == d.min())
    idx = best[0] if len(best) == 1 else [b for b in best if b % 2 == 0][0]
    return math.copysign(GRID[idx], v) if v < 0 else GRID[idx]


def reference_mxfp4(w: np.ndarray) -> np.ndarray:
    o, i = w.shape
    out = np.zeros((o, i))
    for r in range(o):
        for b in range(0, i, 32):
            blk = w[r, b : b + 32].astype(np.float64)
            amax = np.abs(blk).max()
            k = 0
            if amax > 0:
                k = math.ceil(math.log2(amax / 6))
                while amax > 6 * 2.0**k:
                    k += 1
                while amax <= 6 * 2.0 ** (k - 1):
                    k -= 1
            out[r, b : b + 32] = [e2m1_round(x / 2.0**k) * 2.0**k for x in blk]
    return out


@pytest.mark.parametrize("shape", [(8, 64), (3, 40), (1, 2), (16, 96)])
def test_quantize_dequant_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-5, 3, shape[1])
    w[0, :2] = 0.0
    packed, scale = quantize_mxfp4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (shape[0], math.ceil(shape[1] / 32))
    np.testing.assert_array_equal(dequant_mxfp4(packed, scale).numpy(), reference_mxfp4(w.numpy()).astype(np.float32))


def test_all_zero_block_gets_unit_scale():
    packed, scale = quantize_mxfp4(torch.zeros(2, 64))
    assert (scale.view(torch.uint8) == 127).all() and (packed == 0).all()


def test_nibble_order_and_bias_match_transformers():
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    w = torch.randn(6, 64) * 10
    packed, scale = quantize_mxfp4(w)
    blocks = packed.view(1, 6, 2, 16)  # [experts, rows, 32-groups, 16 bytes]
    ref = _convert_moe_packed_tensors(blocks, scale.view(torch.uint8).view(1, 6, 2), dtype=torch.float32)
    assert torch.equal(ref[0].t(), dequant_mxfp4(packed, scale))
    assert torch.equal(dequant_mxfp4(packed.view(torch.int8), scale.view(torch.uint8)), dequant_mxfp4(packed, scale))


def _mx_from_exponents(k: torch.Tensor, seed: int = 0):
    """Random codes with chosen per-32-block exponents."""
    g = torch.Generator().manual_seed(seed)
    o, nb = k.shape
    codes = torch.randint(0, 256, (o, nb * 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scale = (k + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    return codes, scale


def test_mxfp4_to_nvfp4_lossless_within_e4m3_range():
    k = torch.randint(-30, -12, (8, 4))  # spread 17 at most
    k[0, 0], k[0, 1] = -30, -13
    packed, scale = _mx_from_exponents(k)
    q, bs, s2, lossless = mxfp4_to_nvfp4(packed, scale)
    assert lossless and torch.equal(q, packed)
    assert math.log2(s2.item()).is_integer() and s2.dtype == torch.float32
    assert torch.equal(dequant_nvfp4(q, bs, s2), dequant_mxfp4(packed, scale))


def test_mxfp4_to_nvfp4_partial_block_and_zero_tensor():
    w = torch.randn(4, 40)
    packed, scale = quantize_mxfp4(w)
    q, bs, s2, lossless = mxfp4_to_nvfp4(packed, scale)
    assert lossless and q.shape == (4, 24) and bs.shape == (4, 3)
    assert torch.equal(dequant_nvfp4(q, bs, s2, (4, 40)), dequant_mxfp4(packed, scale))
    z, zs = quantize_mxfp4(torch.zeros(2, 32))
    q, bs, s2, lossless = mxfp4_to_nvfp4(z, zs)
    assert lossless and s2.item() == 1.0 and (bs.float() == 1).all() and (q == 0).all()


def test_mxfp4_to_nvfp4_falls_back_when_spread_too_wide():
    k = torch.zeros(4, 2, dtype=torch.int64)
    k[0, 0], k[1, 1] = 20, -20
    packed, scale = _mx_from_exponents(k, seed=3)
    q, bs, s2, lossless = mxfp4_to_nvfp4(packed, scale)
    assert not lossless
    w = dequant_mxfp4(packed, scale)
    assert torch.equal(s2, global_scale(w.abs().amax()))
    rq, rbs = quantize_nvfp4(w, s2)
    assert torch.equal(q, rq) and torch.equal(bs.view(torch.uint8), rbs.view(torch.uint8))


def test_rejects_bad_inputs():
    with pytest.raises(FormatError):
        quantize_mxfp4(torch.randn(2, 3))
    packed, scale = quantize_mxfp4(torch.randn(2, 64))
    with pytest.raises(FormatError):
        dequant_mxfp4(packed, scale[:, :1])
    with pytest.raises(FormatError):
        dequant_mxfp4(packed.float(), scale)
    bad = scale.view(torch.uint8).clone()
    bad[0, 0] = 255
    with pytest.raises(FormatError):
        dequant_mxfp4(packed, bad)


def test_fused_group_shares_one_scale_2():
    from engine.formats.mxfp4.helpers import mxfp4_group_scale_2

    p1, s1 = _mx_from_exponents(torch.randint(-5, 1, (4, 2)), seed=1)
    p3, s3 = _mx_from_exponents(torch.randint(5, 11, (4, 2)), seed=2)  # group spread <= 16
    s2, lossless = mxfp4_group_scale_2((p1, s1), (p3, s3))
    assert lossless
    for p, s in ((p1, s1), (p3, s3)):
        q, bs, got_s2, ok = mxfp4_to_nvfp4(p, s, s2)
        assert ok and torch.equal(got_s2, s2) and torch.equal(q, p)
        assert torch.equal(dequant_nvfp4(q, bs, s2), dequant_mxfp4(p, s))
    far, fs = _mx_from_exponents(torch.full((4, 2), 30), seed=3)  # spread 35 with p1: requantize both
    s2, lossless = mxfp4_group_scale_2((p1, s1), (far, fs))
    assert not lossless
    amax = torch.maximum(dequant_mxfp4(p1, s1).abs().amax(), dequant_mxfp4(far, fs).abs().amax())
    assert torch.equal(s2, global_scale(amax))
    q, bs, _, ok = mxfp4_to_nvfp4(p1, s1, s2)
    rq, rbs = quantize_nvfp4(dequant_mxfp4(p1, s1), s2)
    assert not ok and torch.equal(q, rq) and torch.equal(bs.view(torch.uint8), rbs.view(torch.uint8))
    q, bs, _, ok = mxfp4_to_nvfp4(p1, s1, 0.3)  # not a power of two: requantized
    assert not ok
