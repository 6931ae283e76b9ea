"""Fast FP8 block cast/dequant (numba on CPU; the BF16 dequant in C too) give the bytes and values of the torch
reference."""

from __future__ import annotations

import pytest
import torch

from engine.core.errors import FormatError
from engine.formats.fp8_block.dispatch import cast_fp8_block_fast, dequant_fp8_block_fast
from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((200, 330), (128, 128)), ((1, 7), (128, 128)),
                                         ((70, 100), (32, 48))])
def test_fast_cast_and_dequant_equal_reference(shape, block, ue8m0, cpu_kernels):
    g = torch.Generator().manual_seed(shape[1])
    w = torch.randn(shape, generator=g) * torch.logspace(-6, 3, shape[1])
    w[0, :3] = torch.tensor([-0.0, 0.0, -1e-30])  # negative zero and an underflow to -0 keep their sign
    if shape[0] > 128:
        w[:128, :block[1]] = 0.0  # an all-zero tile
    w = w.to(torch.bfloat16)
    q, s = cast_fp8_block_fast(w, block, ue8m0, device="cpu")
    rq, rs = cast_fp8_block(w, block, ue8m0)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert s.dtype == rs.dtype and torch.equal(s.float(), rs.float())
    for dtype in (torch.float32, torch.bfloat16):
        d = dequant_fp8_block_fast(q, s, block, device="cpu", dtype=dtype)
        assert d.dtype == dtype and torch.equal(d, dequant_fp8_block(q, s, block).to(dtype))


def test_fast_paths_reject_bad_input():
    with pytest.raises(FormatError):
        cast_fp8_block_fast(torch.tensor([[1.0, float("nan")]]), device="cpu")
    q, s = cast_fp8_block(torch.randn(8, 8))
    bad = q.view(torch.uint8).clone()
    bad[0, 0] = 0xFF
    with pytest.raises(FormatError):
        dequant_fp8_block_fast(bad.view(torch.float8_e4m3fn), s, device="cpu")
    with pytest.raises(FormatError):
        dequant_fp8_block_fast(q.float(), s, device="cpu")


def test_fast_cast_rounds_every_e4m3_tie_to_even():
    pos = torch.arange(0, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (pos[:-1] + pos[1:]) / 2
    vals = torch.cat([pos, mids, -mids, torch.tensor([2.0**-10, 3 * 2.0**-11, -(2.0**-10)])])
    row = torch.cat([torch.tensor([448.0]), vals])  # tile amax 448: scale exactly 1, quotients are the values
    w = row.unsqueeze(0)
    q, s = cast_fp8_block_fast(w, (1, w.shape[1]), device="cpu")
    rq, _ = cast_fp8_block(w, (1, w.shape[1]))
    assert s.item() == 1.0
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
