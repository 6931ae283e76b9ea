"""NVFP4 reference vs modelopt's NVFP4QTensor (bytes) and compressed-tensors' NVFP4PackedCompressor (decode)."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.core.errors import FormatError
from engine.formats.e2m1 import e2m1_codes
from engine.formats.nvfp4.helpers import dequant_nvfp4, global_scale, packed_cols, quantize_nvfp4, weight_amax


@pytest.fixture(scope="module")
def nvfp4_qtensor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    return NVFP4QTensor


def _assert_modelopt_equal(qt, w: torch.Tensor, scale_2: torch.Tensor):
    packed, bs = quantize_nvfp4(w, scale_2)
    mq, ms, _ = qt.quantize(w.clone(), 16, weights_scaling_factor_2=scale_2.clone())
    assert packed.dtype == torch.uint8 and bs.dtype == torch.float8_e4m3fn
    assert torch.equal(packed, mq._quantized_data)
    assert torch.equal(bs.view(torch.uint8), ms.view(torch.uint8))
    assert packed.shape == (*w.shape[:-1], packed_cols(w.shape[-1]))
    if w.shape[-1] % 16 == 0:
        ref = mq.dequantize(dtype=torch.float32, scale=ms, double_scale=scale_2, block_sizes={-1: 16})
        assert torch.equal(dequant_nvfp4(packed, bs, scale_2, w.shape), ref)
    return packed, bs


@pytest.mark.parametrize("shape", [(64, 128), (3, 40), (1, 16), (17, 8), (5, 2, 48)])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_bytes_equal_modelopt(nvfp4_qtensor, shape, scale):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[-1]) * scale
    _assert_modelopt_equal(nvfp4_qtensor, w, global_scale(weight_amax(w)))


def test_zero_blocks_and_mismatched_global_scales(nvfp4_qtensor):
    w = torch.randn(8, 64)
    w[:, 16:32] = 0.0
    w[3] = 0.0
    s2 = global_scale(weight_amax(w))
    _assert_modelopt_equal(nvfp4_qtensor, w, s2)
    # a fused group's larger scale_2 (block scales clamp at 2^-9) and a too-small one (clamp at 448, saturate at 6)
    _assert_modelopt_equal(nvfp4_qtensor, w, s2 * 1e4)
    packed, bs = _assert_modelopt_equal(nvfp4_qtensor, w, s2 / 1e4)
    assert bs.float().max() == 448.0


def test_all_zero_tensor_gets_unit_scales_and_decodes_to_zero(nvfp4_qtensor):
    w = torch.zeros(4, 32)
    s2 = global_scale(weight_amax(w))
    assert s2.dtype == torch.float32 and s2.item() == 1.0
    packed, bs = _assert_modelopt_equal(nvfp4_qtensor, w, s2)
    assert (packed == 0).all() and (bs.float() == 1.0).all()
    assert (dequant_nvfp4(packed, bs, s2) == 0).all()


def test_e2m1_ties_round_to_even_and_saturate():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 0.24, 0.26, -0.25, -0.0, 0.0, -5.0, -1e9])
    want = [0, 2, 2, 4, 4, 6, 6, 7, 7, 0, 1, 8, 0, 0, 14, 15]
    assert e2m1_codes(x).tolist() == want


def test_ties_through_quantize_hand_table(nvfp4_qtensor):
    # block amax 6 with scale_2 = 1 -> block scale exactly 1: the scaled values are the inputs themselves
    row = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -3.5, -0.0, 0.0, 3.0, -6.0, 0.5]
    w = torch.tensor([row])
    packed, bs = _assert_modelopt_equal(nvfp4_qtensor, w, torch.tensor(1.0))
    codes = torch.stack((packed & 0xF, packed >> 4), -1).flatten().tolist()
    assert codes == [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 14, 0, 0, 5, 15, 1]
    assert bs.float().item() == 1.0
    assert dequant_nvfp4(packed, bs, 1.0).tolist()[0] == [6, 0, 1, 1, 2, 2, 4, 4, -0.0, -1, -4, 0, 0, 3, -6, 0.5]


def test_negative_zero_sign():
    w = torch.tensor([[-0.0] * 15 + [1.0]])
    packed, _ = quantize_nvfp4(w, global_scale(1.0))
    assert (packed[0, :7] == 0).all()


def test_compressed_tensors_decompress_equals_our_decode():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
        from compressed_tensors.quantization import preset_name_to_scheme
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    w = torch.randn(48, 96) * torch.logspace(-3, 1, 96)
    w[:, :16] = 0
    s2 = global_scale(weight_amax(w))
    packed, bs = quantize_nvfp4(w, s2)
    sd = {"weight_packed": packed, "weight_scale": bs, "weight_global_scale": (1.0 / s2).reshape(1)}
    out = NVFP4PackedCompressor.decompress(sd, scheme)["weight"]
    ours = dequant_nvfp4(packed, bs, s2, w.shape)
    assert torch.equal(out, ours.to(out.dtype))


def test_rejects_bad_scale_and_shapes():
    with pytest.raises(FormatError):
        quantize_nvfp4(torch.ones(2, 16), 0.0)
    with pytest.raises(FormatError):
        quantize_nvfp4(torch.ones(2, 16), float("nan"))
    with pytest.raises(FormatError):
        quantize_nvfp4(torch.tensor([[float("inf")] * 16]), 1.0)
    with pytest.raises(FormatError):
        global_scale(-1.0)
    p, b = quantize_nvfp4(torch.ones(2, 32), 1.0)
    with pytest.raises(FormatError):
        dequant_nvfp4(p, b[:, :1], 1.0)
    with pytest.raises(FormatError):
        dequant_nvfp4(p, b, 1.0, shape=(2, 33))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_gpu)])
def test_packed_bytes_decode_as_their_unpacked_codes(device):
    """decode_packed (one lookup per byte) gives decode_e2m1(unpack_nibbles(...)) bit for bit: every byte value,
    odd shapes, a strided view, int8 storage and an empty tensor."""
    from engine.formats.e2m1 import decode_e2m1, decode_packed, unpack_nibbles

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    rand = torch.randint(0, 256, (3, 7, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    cases = [every, rand, rand[:, ::2, 1:], rand.view(torch.int8), torch.zeros(0, 4, dtype=torch.uint8)]
    for p in cases:
        p = p.to(device)
        want = decode_e2m1(unpack_nibbles(p))
        got = decode_packed(p)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # -0.0 and 0.0 told apart


def test_packed_bytes_stored_in_a_wider_dtype_are_read_as_bytes():
    """A packed weight handed over as int16 is its bytes (as stored): a block scale that does not fit them is named."""
    packed = torch.zeros(4, 8, dtype=torch.int16)  # 16 bytes a row: 32 values, 2 blocks
    with pytest.raises(FormatError, match="does not fit packed weight"):
        dequant_nvfp4(packed, torch.ones(4, 1, dtype=torch.float8_e4m3fn), 1.0)
    assert dequant_nvfp4(packed, torch.ones(4, 2, dtype=torch.float8_e4m3fn), 1.0).shape == (4, 32)
