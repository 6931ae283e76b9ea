"""DeepSeek FP8 block-128 numerics: cast to float8_e4m3fn with one scale per block, and exact dequantization.

Format (DeepSeek V3/R1, and V4 attention):
  * weight: float8_e4m3fn [o, i]
  * scale:  one per `block` (128×128 by default) tile, shape [ceil(o/bo), ceil(i/bi)]; it is a MULTIPLIER
    (value = fp32(code) × fp32(scale)) although V3 names it `weight_scale_inv`. V3/R1 store it as float32,
    V4 (`scale_fmt: ue8m0`, tensors named `.scale`) as torch.float8_e8m0fnu: a power of two 2^(byte-127).

Edge decisions (tested in tests/unit/engine/formats/test_fp8_block_helpers.py):
  * Edge tiles are zero-padded: the amax of a partial tile is the amax of its real elements.
  * An all-zero tile gets scale 1.0 (never 0, never NaN); its codes are all +0 and it decodes to exact zeros.
    A tile whose amax/448 underflows float32 to 0 (amax < ~6e-43) is treated the same way.
  * fp32 scale = fp32(block_amax) / 448 (one correctly rounded fp32 division). Codes are
    fp32(x) / scale, clamped to [-448, 448] and cast round-to-nearest-even; a rounding of the scale
    that leaves |x/scale| a hair above 448 saturates to 448 (never NaN).
  * ue8m0=True: scale = the smallest power of two 2^k with block_amax <= 448·2^k (rounded UP, so no
    element saturates); stored as float8_e8m0fnu. Exponents are clamped to e8m0's finite range [-127, 127].
  * Non-finite input (inf/NaN) is rejected with FormatError; 1-D or 0-size tensors too.
  * dequant accepts float32/bfloat16/float16 scales, float8_e8m0fnu and raw uint8 E8M0 bytes
    (2^(byte-127)); the E8M0 NaN byte 0xFF is rejected.
"""

from __future__ import annotations

import torch

from engine.core.errors import FormatError
from engine.formats.grid import infer_block, scale_grid

FP8_MAX = 448.0
E8M0_BIAS = 127

__all__ = [
    "FP8_MAX",
    "cast_fp8_block",
    "dequant_fp8_block",
    "e8m0_from_exponent",
    "infer_block",
    "scale_grid",
    "scale_to_fp32",
    "scales_from_amax",
]


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2 or w.numel() == 0:
        raise FormatError(
            f"{what} needs a non-empty 2-D tensor, got shape {tuple(w.shape)}",
            at=what,
            hint="FP8 block scaling applies to 2-D GEMM weights only",
        )


def e8m0_from_exponent(k: torch.Tensor) -> torch.Tensor:
    """float8_e8m0fnu tensor holding 2^k for integer exponents k (clamped to [-127, 127])."""
    byte = (k.to(torch.int32).clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)
    return byte.view(torch.float8_e8m0fnu)


def scale_to_fp32(scale: torch.Tensor) -> torch.Tensor:
    """Block scales of any supported storage dtype as float32 multipliers (exact)."""
    if scale.dtype in (torch.float8_e8m0fnu, torch.uint8):
        byte = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
        if bool((byte == 255).any()):
            raise FormatError("E8M0 scale holds the NaN byte 0xFF", at="scale",
                              hint="the source scale tensor is corrupt")
        # 2^(b-127) is exact in fp32 for b in [1, 254]; b == 0 is 2^-127, a float32 subnormal, also exact.
        return torch.ldexp(torch.ones_like(byte, dtype=torch.float32), byte.to(torch.int32) - E8M0_BIAS)
    if scale.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return scale.to(torch.float32)
    raise FormatError(
        f"unsupported block-scale dtype {scale.dtype}",
        at="scale",
        hint="expected float32, bfloat16, float8_e8m0fnu or uint8 (E8M0 bytes)",
    )


def _block_amax(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-tile amax of |x| (fp32), edges zero-padded."""
    o, i = x.shape
    bo, bi = block
    go, gi = scale_grid((o, i), block)
    pad = torch.nn.functional.pad(x.abs(), (0, gi * bi - i, 0, go * bo - o))
    return pad.view(go, bo, gi, bi).amax(dim=(1, 3))


def _expand(scale32: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    o, i = shape
    bo, bi = block
    return scale32.repeat_interleave(bo, dim=0)[:o].repeat_interleave(bi, dim=1)[:, :i]


def _ue8m0_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest integer k with amax <= 448 * 2^k (exact, via float64), for amax > 0."""
    a = amax.to(torch.float64)
    k = torch.ceil(torch.log2(a / FP8_MAX))
    k = torch.where(a > FP8_MAX * torch.exp2(k), k + 1, k)  # log2 rounded too low
    k = torch.where(a <= FP8_MAX * torch.exp2(k - 1), k - 1, k)  # log2 rounded too high
    return k


def cast_fp8_block(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast a 2-D float weight to DeepSeek FP8 block format.

    Returns (w_fp8 float8_e4m3fn [o, i], scale [ceil(o/bo), ceil(i/bi)]): float32 multipliers, or
    float8_e8m0fnu powers of two when `ue8m0`. See the module docstring for the edge rules.
    """
    _check_2d(w, "cast_fp8_block")
    x = w.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise FormatError("weight holds inf or NaN", at="cast_fp8_block", hint="fix the source weight first")
    block = (int(block[0]), int(block[1]))
    stored, scale32 = scales_from_amax(_block_amax(x, block), ue8m0)
    q = (x / _expand(scale32, tuple(x.shape), block)).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), stored


def scales_from_amax(amax: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored scale, its float32 value) from float32 tile amax, by the rules in the module docstring."""
    if ue8m0:
        k = _ue8m0_exponent(amax)
        k = torch.where(amax > 0, k, torch.zeros_like(k)).clamp(-E8M0_BIAS, E8M0_BIAS)
        stored = e8m0_from_exponent(k)
        return stored, scale_to_fp32(stored)
    scale32 = amax / FP8_MAX
    scale32 = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    return scale32, scale32


def dequant_fp8_block(w_fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Exact dequantization: fp32(code) × fp32(scale) broadcast over tiles, edges cut. Returns float32."""
    _check_2d(w_fp8, "dequant_fp8_block")
    if w_fp8.dtype != torch.float8_e4m3fn:
        raise FormatError(
            f"dequant_fp8_block expects float8_e4m3fn codes, got {w_fp8.dtype}",
            at="dequant_fp8_block",
            hint="pass the FP8 weight tensor itself",
        )
    block = (int(block[0]), int(block[1]))
    want = scale_grid(tuple(w_fp8.shape), block)
    if tuple(scale.shape) != want:
        raise FormatError(
            f"scale shape {tuple(scale.shape)} does not match weight {tuple(w_fp8.shape)} with block {block}: "
            f"expected {want}",
            at="dequant_fp8_block",
            hint="check the weight's scale companion and the block size",
        )
    s = scale_to_fp32(scale)
    (o, i), (bo, bi) = w_fp8.shape, block
    if o % bo or i % bi:  # edge tiles cut: the scales expanded to the weight's shape
        return w_fp8.to(torch.float32) * _expand(s, (o, i), block)
    out = w_fp8.to(torch.float32)  # whole tiles: each tile times its scale in place, the same products
    out.view(o // bo, bo, i // bi, bi).mul_(s.reshape(o // bo, 1, i // bi, 1))
    return out
