"""Activation fake quantization: hand-written value tables, the sign of zero, saturation, zero blocks."""

from __future__ import annotations

import pytest
import torch

from engine.eval.actquant import fake_quant_fp8_group, fake_quant_nvfp4

ONE = torch.tensor(1.0)


def test_nvfp4_grid_values_pass_through_with_unit_scales():
    # block amax 6 with g = 1: sf = e4m3(6/6) = 1, so every E2M1 value is kept exactly
    x = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 0], dtype=torch.float32)
    assert torch.equal(fake_quant_nvfp4(x, ONE, ONE), x)


def test_nvfp4_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] + [0.0] * 8)
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0] + [0.0] * 8)
    assert torch.equal(fake_quant_nvfp4(x, ONE, ONE), want)
    # a global scale g that puts the block scale at its ceiling: sf = min(g·amax/6, 448) = 448, x·g/448 > 6 saturates
    y = torch.tensor([6.0] + [0.0] * 15)
    g = torch.tensor(1000.0)
    got = fake_quant_nvfp4(y, g, 1.0 / g)
    assert float(got[0]) == pytest.approx(6.0 * 448 / 1000.0, rel=1e-6)  # 6 · 448 · (1/g), float32


def test_nvfp4_block_scale_is_rounded_to_e4m3_and_dequantized_with_the_input_scale():
    # amax 13 with g = 1: sf = e4m3(13/6 = 2.1667) = 2.25; x / 2.25 rounded to E2M1, times 2.25
    x = torch.tensor([13.0, 1.0, -4.0, 0.3] + [0.0] * 12)
    want = torch.tensor([13.5, 1.125, -4.5, 0.0] + [0.0] * 12)
    assert torch.equal(fake_quant_nvfp4(x, ONE, ONE), want)
    # the GEMM dequantizes with the input scale it is given (here twice 1/g)
    assert torch.equal(fake_quant_nvfp4(x, ONE, torch.tensor(2.0)), 2 * want)


def test_nvfp4_zero_block_negative_zero_and_shape():
    x = torch.zeros(2, 3, 32, dtype=torch.bfloat16)
    x[0, 0, 16] = -0.0
    got = fake_quant_nvfp4(x, ONE, ONE)
    assert got.shape == x.shape and got.dtype == torch.bfloat16 and not bool(got.any())
    odd = torch.tensor([[3.0] * 20])  # a last partial block is padded and cut off again
    assert torch.equal(fake_quant_nvfp4(odd, ONE, ONE), odd)


def test_fp8_groups_per_token_dynamic():
    x = torch.zeros(2, 256)
    x[0, 0], x[0, 1], x[0, 128] = 448.0, 1.0, 3.0  # scale 1 in group 0, 3/448 in group 1
    x[1, 5] = -0.001  # alone in its group: it is the group's amax, kept within float32 rounding
    got = fake_quant_fp8_group(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert float(got[0, 0]) == 448.0 and float(got[0, 1]) == 1.0 and float(got[0, 128]) == 3.0
    assert float(got[1, 5]) == pytest.approx(-0.001, rel=1e-6)
    y = torch.tensor([[448.0, 17.0, 0.3] + [0.0] * 125])  # scale 1: plain e4m3 rounding (17 -> 16, 0.3 -> 0.3125)
    assert fake_quant_fp8_group(y)[0, :3].tolist() == [448.0, 16.0, 0.3125]
