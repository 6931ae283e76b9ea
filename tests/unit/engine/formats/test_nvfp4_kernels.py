"""Fast NVFP4 kernels (C and numba on CPU, torch/Triton on CUDA) produce the bytes of the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.core.errors import FormatError
from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block
from engine.formats.nvfp4.dispatch import bf16_to_nvfp4, fp8_block_amax, fp8_block_to_nvfp4, resolve_device
from engine.formats.nvfp4.helpers import global_scale, quantize_nvfp4, weight_amax


@pytest.fixture(params=["parallel", "serial"], autouse=True)
def kernel_mode(request, cpu_kernels):
    """Every CPU check runs four times: C and numba kernels (tests/conftest.py), each over every core and on the
    calling thread alone (kernel_mode.serial_kernels)."""
    if request.param == "parallel":
        yield request.param
        return
    from engine.formats.kernel_mode import serial_kernels

    with serial_kernels():
        yield request.param


def requires_gpu(fn):
    """CUDA-only: CI deselects these (-m "not requires_gpu"); elsewhere without a GPU they skip."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return pytest.mark.requires_gpu(no_gpu(fn))


def _same(a, b):
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8))


def _fp8(shape, block=(128, 128), ue8m0=False, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * scale * torch.logspace(-2, 1, shape[1])
    return cast_fp8_block(w, block=block, ue8m0=ue8m0)


def test_e4m3_rounding_matches_torch_cast_including_ties():
    pos = torch.arange(1, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().double()
    mids = (pos[:-1] + pos[1:]) / 2
    rnd = torch.exp2(torch.empty(3000, dtype=torch.float64).uniform_(-9, np.log2(448)))
    vals = torch.cat([pos, mids, torch.nextafter(mids.float(), torch.tensor(0.0)).double(), rnd]).float()
    vals = vals.clamp(2.0**-9, 448.0)
    want = vals.to(torch.float8_e4m3fn).view(torch.uint8)
    # through the CPU kernel's own block-scale rounding: with scale_2 = fp32(1/6), 6·scale_2 is exactly 1.0,
    # so the block scale of a row whose amax is v is e4m3(v)
    scale_2 = torch.tensor(1 / 6, dtype=torch.float32)
    assert float(torch.tensor(6.0) * scale_2) == 1.0
    w = torch.zeros(len(vals), 16)
    w[:, 0] = vals
    _, bs = bf16_to_nvfp4(w, scale_2, device="cpu")
    assert torch.equal(bs.view(torch.uint8)[:, 0], want)


@pytest.mark.parametrize(
    "shape,block,ue8m0",
    [((256, 384), (128, 128), False), ((200, 320), (128, 128), True), ((3, 40), (128, 128), False),
     ((1, 16), (128, 128), False), ((70, 100), (32, 48), False), ((33, 72), (16, 24), True)],
)
def test_fused_fp8_to_nvfp4_equals_reference(shape, block, ue8m0):
    q, s = _fp8(shape, block, ue8m0, seed=shape[0])
    x = dequant_fp8_block(q, s, block)
    s2 = global_scale(weight_amax(x))
    _same(fp8_block_to_nvfp4(q, s, s2, device="cpu", block=block), quantize_nvfp4(x, s2))
    # a fused group's larger scale_2 (block scales clamp low) and a smaller one (clamp at 448, saturation)
    for f in (37.0, 1e-3):
        _same(fp8_block_to_nvfp4(q, s, s2 * f, device="cpu", block=block), quantize_nvfp4(x, s2 * f))
    assert torch.equal(fp8_block_amax(q, s, device="cpu", block=block), x.abs().amax())


def test_block_inferred_from_scale_shape_and_zero_tensor():
    q, s = cast_fp8_block(torch.zeros(130, 260))
    packed, bs = fp8_block_to_nvfp4(q, s, global_scale(0.0), device="cpu")
    assert (packed == 0).all() and (bs.float() == 1.0).all()
    assert fp8_block_amax(q, s, device="cpu").item() == 0.0


def test_bf16_to_nvfp4_equals_reference():
    w = (torch.randn(96, 80) * torch.logspace(-3, 2, 80)).to(torch.bfloat16)
    w[5] = 0
    w[6, :16] = -0.0
    s2 = global_scale(weight_amax(w))
    _same(bf16_to_nvfp4(w, s2, device="cpu"), quantize_nvfp4(w.float(), s2))
    _same(bf16_to_nvfp4(w.float()[:, :40], s2, device="cpu"), quantize_nvfp4(w.float()[:, :40], s2))


def test_rejects_nan_codes_and_bad_device():
    q, s = _fp8((16, 32))
    bad = q.view(torch.uint8).clone()
    bad[3, 5] = 0x7F
    with pytest.raises(FormatError):
        fp8_block_to_nvfp4(bad.view(torch.float8_e4m3fn), s, 1.0, device="cpu")
    with pytest.raises(FormatError):
        fp8_block_amax(bad.view(torch.float8_e4m3fn), s, device="cpu")
    with pytest.raises(FormatError):
        fp8_block_to_nvfp4(q.float(), s, 1.0, device="cpu")
    with pytest.raises(FormatError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "cpu"
        with pytest.raises(FormatError):
            resolve_device("cuda")


@requires_gpu
@pytest.mark.parametrize("triton", ["1", "0"])
@pytest.mark.parametrize(
    "shape,block,ue8m0",
    [((2048, 7168), (128, 128), False), ((200, 328), (128, 128), True), ((70, 100), (32, 48), False)],
)
def test_cuda_bytes_equal_cpu(shape, block, ue8m0, triton, monkeypatch):
    monkeypatch.setenv("QUANTDECK_NO_TRITON", "0" if triton == "1" else "1")
    q, s = _fp8(shape, block, ue8m0, seed=1)
    amax_cpu = fp8_block_amax(q, s, device="cpu", block=block)
    assert torch.equal(fp8_block_amax(q, s, device="cuda", block=block), amax_cpu)
    s2 = global_scale(amax_cpu)
    _same(fp8_block_to_nvfp4(q, s, s2, device="cuda", block=block),
          fp8_block_to_nvfp4(q, s, s2, device="cpu", block=block))
    for f in (37.0, 1e-3):  # block scales clamped low / high
        _same(
            fp8_block_to_nvfp4(q, s, s2 * f, device="cuda", block=block),
            fp8_block_to_nvfp4(q, s, s2 * f, device="cpu", block=block),
        )
    w = dequant_fp8_block(q, s, block).to(torch.bfloat16)
    _same(bf16_to_nvfp4(w, s2, device="cuda"), bf16_to_nvfp4(w, s2, device="cpu"))
    qd, sd = q.cuda(), s.cuda()  # already on the device: nothing is copied up, results still on the host
    assert torch.equal(fp8_block_amax(qd, sd, device="cuda", block=block), amax_cpu)
    _same(fp8_block_to_nvfp4(qd, sd, s2, device="cuda", block=block),
          fp8_block_to_nvfp4(q, s, s2, device="cpu", block=block))


def test_concurrent_calls_from_threads_are_safe():
    from concurrent.futures import ThreadPoolExecutor

    q, s = _fp8((256, 256), seed=7)
    s2 = global_scale(fp8_block_amax(q, s, device="cpu"))
    want = quantize_nvfp4(dequant_fp8_block(q, s), s2)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: fp8_block_to_nvfp4(q, s, s2, device="cpu"), range(8)))
    for got in results:
        _same(got, want)


def test_block_scales_at_every_e4m3_tie():
    pos = torch.arange(1, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    targets = torch.cat([pos, (pos[:-1] + pos[1:]) / 2, torch.tensor([2.0**-10, 1e-3, 500.0])])
    w = torch.zeros(len(targets), 16)
    w[:, 3] = targets * 6  # scale_2 = 1: block scale = amax / 6 = target exactly
    w[:, 5] = -targets * 2
    _same(bf16_to_nvfp4(w, 1.0, device="cpu"), quantize_nvfp4(w, 1.0))
    q, s = cast_fp8_block(w, block=(1, 16))
    x = dequant_fp8_block(q, s, (1, 16))
    _same(fp8_block_to_nvfp4(q, s, 1.0, device="cpu", block=(1, 16)), quantize_nvfp4(x, 1.0))


def test_fused_group_shares_scale_2():
    from engine.formats.nvfp4.dispatch import fp8_group_to_nvfp4

    w1, s1 = _fp8((128, 256), seed=1, scale=0.01)
    w3, s3 = _fp8((128, 256), seed=2, scale=0.5)  # the larger amax sets the shared scale
    s2, parts = fp8_group_to_nvfp4([(w1, s1), (w3, s3)], device="cpu")
    x1, x3 = dequant_fp8_block(w1, s1), dequant_fp8_block(w3, s3)
    assert torch.equal(s2, global_scale(weight_amax(x1, x3)))
    _same(parts[0], quantize_nvfp4(x1, s2))
    _same(parts[1], quantize_nvfp4(x3, s2))
    with pytest.raises(FormatError):
        fp8_group_to_nvfp4([], device="cpu")


@requires_gpu
def test_cuda_fused_group_equals_cpu():
    from engine.formats.nvfp4.dispatch import fp8_group_to_nvfp4

    pairs = [_fp8((256, 512), seed=k, ue8m0=bool(k)) for k in range(2)]
    s2c, cpu = fp8_group_to_nvfp4(pairs, device="cpu")
    s2g, gpu = fp8_group_to_nvfp4(pairs, device="cuda")
    assert torch.equal(s2c, s2g.cpu())
    for a, b in zip(cpu, gpu, strict=True):
        _same(a, b)


def test_a_block_divisor_that_underflows_to_zero_gives_the_reference_codes():
    """Weights of subnormal size: s_e4m3 · scale_2 rounds to 0 and x / 0 is ±inf or NaN; the reference's
    searchsorted puts both at code 7, and so must every kernel (a NaN once fell through every comparison to 0)."""
    from engine.formats.nvfp4 import host

    x = torch.zeros(2, 40)
    x[0, 0], x[0, 16], x[1, 3], x[1, 33] = 9e-40, 1.4e-45, -9e-40, -1.4e-45
    s2 = global_scale(weight_amax(x))
    want = quantize_nvfp4(x, s2)
    got = host.float_to_nvfp4(x.numpy(), float(s2))
    assert torch.equal(torch.from_numpy(got[0]), want[0])
    assert torch.equal(torch.from_numpy(got[1]), want[1].view(torch.uint8))
    q = torch.tensor([[0x08] + [0] * 15 + [0x01] + [0] * 15], dtype=torch.uint8)  # FP8 bytes 2^-6 and 2^-9
    sc = torch.full((1, 1), 1e-30)
    tiny = torch.tensor(1e-44)  # a scale_2 given by the caller: every divisor underflows
    want = quantize_nvfp4(dequant_fp8_block(q.view(torch.float8_e4m3fn), sc, (128, 128)), tiny)
    got = host.fp8_block_to_nvfp4(q.numpy(), sc.numpy(), (128, 128), float(tiny))
    assert torch.equal(torch.from_numpy(got[0]), want[0])
    assert torch.equal(torch.from_numpy(got[1]), want[1].view(torch.uint8))


@requires_gpu
@pytest.mark.parametrize("triton", ["1", "0"])
def test_cuda_block_divisor_underflow_equals_the_reference(triton, monkeypatch):
    """The divisor-underflow case above on CUDA (Triton's comparisons met a NaN too)."""
    monkeypatch.setenv("QUANTDECK_NO_TRITON", "0" if triton == "1" else "1")
    q = torch.tensor([[0x08] + [0] * 15 + [0x01] + [0] * 15] * 3, dtype=torch.uint8).view(torch.float8_e4m3fn)
    sc = torch.full((1, 1), 1e-30)
    tiny = torch.tensor(1e-44)
    want = quantize_nvfp4(dequant_fp8_block(q, sc, (128, 128)), tiny)
    _same(fp8_block_to_nvfp4(q, sc, tiny, device="cuda", block=(128, 128)), want)


def test_host_kernels_refuse_a_scale_2_or_block_scale_they_cannot_use():
    from engine.formats.nvfp4 import host

    w, s = np.zeros((2, 32), np.uint8), np.ones((1, 1), np.float32)
    for bad in (0.0, -1.0, float("nan"), float("inf"), float(host.MAX_SCALE_2) * 2):
        with pytest.raises(FormatError, match="weight_scale_2 must be"):
            host.fp8_block_to_nvfp4(w, s, (128, 128), bad)
        with pytest.raises(FormatError, match="weight_scale_2 must be"):
            host.float_to_nvfp4(np.ones((2, 32), np.float32), bad)
    host.fp8_block_to_nvfp4(w, s, (128, 128), host.MAX_SCALE_2)  # global_scale's largest answer is fine
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(FormatError, match="block scale holds inf, NaN or a negative"):
            host.fp8_block_to_nvfp4(w, np.full((1, 1), bad, np.float32), (128, 128), 1.0)
        with pytest.raises(FormatError, match="block scale holds inf, NaN or a negative"):
            host.fp8_block_amax(w, np.full((1, 1), bad, np.float32), (128, 128))
