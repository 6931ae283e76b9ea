"""MXFP4 (OCP microscaling FP4) numerics, as the public DeepSeek V4 release ships its routed experts.

Format: `packed` uint8 [o, i/2] — E2M1 codes two per byte, element 0 in the LOW nibble (as transformers'
`integrations/mxfp4.py` unpacks: `blk & 0x0F` → even columns, `blk >> 4` → odd); `scale` float8_e8m0fnu
[o, ceil(i/32)], one power of two 2^(byte-127) per 32 inputs. Value = e2m1(code) × 2^(byte-127), exact in fp32.
(torch.float4_e2m1fn_x2 / int8 packed tensors and raw uint8 scale bytes are accepted too.)

Edge decisions (tested in tests/unit/engine/formats/test_mxfp4_helpers.py):
  * quantize: scale = the smallest power of two with block_amax <= 6·scale (rounded UP, so nothing
    saturates — the UE8M0 rule DeepSeek uses for its FP8 scales), exponent clamped to [-127, 127];
    an all-zero 32-block gets scale 1.0 (byte 127). Elements are x / scale (exact) rounded by the E2M1 rule.
    A partial last 32-block is zero-padded; i must be even.
  * mxfp4_to_nvfp4: lossless when, over the 32-blocks that hold a non-zero code, max_k - min_k <= 17
    (e4m3 holds the powers of two 2^-9 … 2^8). Then scale_2 = 2^(max_k - 8), each 16-block scale =
    2^(k - log2 scale_2) (all-zero 32-blocks: 1.0), codes are copied byte for byte, and the decode is
    identical. Otherwise the tensor is requantized from its dequantized values with
    scale_2 = global_scale(amax) by the NVFP4 reference rules, and lossless=False.
  * Fused groups (w1/w3) must share scale_2: `mxfp4_group_scale_2((p1, s1), (p3, s3))` picks it over the
    whole group (lossless iff the group's spread <= 17), then `mxfp4_to_nvfp4(p, s, scale_2)` per member.
"""

from __future__ import annotations

import torch

from engine.core.errors import FormatError
from engine.formats.e2m1 import E2M1_MAX, decode_packed, e2m1_codes, pack_nibbles, unpack_nibbles
from engine.formats.fp8_block.helpers import E8M0_BIAS, e8m0_from_exponent, scale_to_fp32
from engine.formats.nvfp4.helpers import as_scale_2, global_scale, quantize_nvfp4

MX_BLOCK = 32
E4M3_POW2_MIN, E4M3_POW2_MAX = -9, 8  # powers of two float8_e4m3fn represents exactly

__all__ = [
    "MX_BLOCK",
    "dequant_mxfp4",
    "mxfp4_exponents",
    "mxfp4_group_scale_2",
    "mxfp4_to_nvfp4",
    "quantize_mxfp4",
]


def _as_packed(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype in (torch.uint8, torch.int8) or str(packed.dtype) == "torch.float4_e2m1fn_x2":
        return packed.view(torch.uint8)
    raise FormatError(
        f"MXFP4 packed weight must be uint8/int8/float4_e2m1fn_x2, got {packed.dtype}",
        at="mxfp4.packed",
        hint="pass the expert weight as stored in the checkpoint",
    )


def mxfp4_exponents(scale: torch.Tensor) -> torch.Tensor:
    """int32 exponents k (scale = 2^k) of E8M0 scales (float8_e8m0fnu or uint8 bytes)."""
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise FormatError(f"MXFP4 scale must be float8_e8m0fnu or uint8, got {scale.dtype}", at="mxfp4.scale")
    byte = scale.view(torch.uint8)
    if bool((byte == 255).any()):
        raise FormatError("E8M0 scale holds the NaN byte 0xFF", at="mxfp4.scale", hint="the source scale is corrupt")
    return byte.to(torch.int32) - E8M0_BIAS


def _check_pair(packed: torch.Tensor, scale: torch.Tensor) -> int:
    i = packed.shape[-1] * 2
    if packed.dim() != 2 or tuple(scale.shape) != (packed.shape[0], -(-i // MX_BLOCK)):
        raise FormatError(
            f"MXFP4 scale {tuple(scale.shape)} does not fit packed weight {tuple(packed.shape)}",
            at="mxfp4",
            hint="expected packed [o, i/2] and scale [o, ceil(i/32)]",
        )
    return i


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D float weight -> (packed uint8 [o, i/2], scale float8_e8m0fnu [o, ceil(i/32)])."""
    if w.dim() != 2 or w.numel() == 0 or w.shape[1] % 2:
        raise FormatError(f"MXFP4 needs a 2-D weight with an even inner dim, got {tuple(w.shape)}", at="quantize_mxfp4")
    x = w.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise FormatError("weight holds inf or NaN", at="quantize_mxfp4", hint="fix the source weight first")
    o, i = x.shape
    xp = torch.nn.functional.pad(x, (0, (-i) % MX_BLOCK)).view(o, -1, MX_BLOCK)
    amax = xp.abs().amax(dim=-1).to(torch.float64)
    k = torch.ceil(torch.log2(amax / E2M1_MAX))
    k = torch.where(amax > E2M1_MAX * torch.exp2(k), k + 1, k)
    k = torch.where(amax <= E2M1_MAX * torch.exp2(k - 1), k - 1, k)
    k = torch.where(amax > 0, k, torch.zeros_like(k)).clamp(-E8M0_BIAS, E8M0_BIAS).to(torch.int32)
    scale = e8m0_from_exponent(k)
    scaled = xp / scale_to_fp32(scale).unsqueeze(-1)
    codes = e2m1_codes(scaled.view(o, -1)[:, :i])
    return pack_nibbles(codes), scale


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Exact float32 values [o, i] of an MXFP4 tensor."""
    p = _as_packed(packed)
    i = _check_pair(p, scale)
    k = mxfp4_exponents(scale)
    vals = decode_packed(p)
    kk = k.repeat_interleave(MX_BLOCK, dim=1)[:, :i]
    return torch.ldexp(vals, kk)


def _nonzero_blocks(codes: torch.Tensor, i: int) -> torch.Tensor:
    """[o, ceil(i/32)] bool: the 32-block holds a non-zero magnitude code."""
    o = codes.shape[0]
    return torch.nn.functional.pad((codes & 0x7) != 0, (0, (-i) % MX_BLOCK)).view(o, -1, MX_BLOCK).any(dim=-1)


def mxfp4_group_scale_2(*pairs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """One NVFP4 `weight_scale_2` for a fused group of MXFP4 tensors ((packed, scale), ...), and whether
    every member converts losslessly with it: 2^(kmax-8) when the group's exponent spread is <= 17
    (1.0 for an all-zero group), else global_scale(group amax) (requantization)."""
    ks = []
    for packed, scale in pairs:
        p = _as_packed(packed)
        i = _check_pair(p, scale)
        nz = _nonzero_blocks(unpack_nibbles(p), i)
        ks.append(mxfp4_exponents(scale)[nz])
    k = torch.cat(ks)
    if k.numel() == 0:
        return torch.ones((), dtype=torch.float32), True
    kmax, kmin = int(k.max()), int(k.min())
    if kmax - kmin <= E4M3_POW2_MAX - E4M3_POW2_MIN:
        return torch.ldexp(torch.ones((), dtype=torch.float32), torch.tensor(kmax - E4M3_POW2_MAX)), True
    amax = torch.stack([dequant_mxfp4(p, s).abs().amax() for p, s in pairs]).amax()
    return global_scale(amax), False


def mxfp4_to_nvfp4(
    packed: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """MXFP4 -> NVFP4 (packed uint8 [o, ceil(i/16)·8], block_scale e4m3 [o, ceil(i/16)], scale_2 fp32, lossless).

    `scale_2` (for fused groups: from mxfp4_group_scale_2) defaults to this tensor's own choice. The codes
    are kept (lossless=True) when scale_2 is a power of two 2^m and every non-zero 32-block's exponent k
    has k - m in [-9, 8]; otherwise the dequantized values are requantized with scale_2 (lossless=False).
    """
    p = _as_packed(packed)
    i = _check_pair(p, scale)
    if scale_2 is None:
        scale_2, _ = mxfp4_group_scale_2((p, scale))
    s2 = as_scale_2(scale_2)
    k = mxfp4_exponents(scale)
    codes = unpack_nibbles(p)
    nz = _nonzero_blocks(codes, i)
    mant, m = torch.frexp(s2)
    m = int(m) - 1
    if float(mant) == 0.5 and -126 <= m:
        rel = k - m
        relnz = rel[nz]
        if relnz.numel() == 0 or (int(relnz.min()) >= E4M3_POW2_MIN and int(relnz.max()) <= E4M3_POW2_MAX):
            return _repack_lossless(p, codes, rel, nz, s2, i)
    q, s8 = quantize_nvfp4(dequant_mxfp4(p, scale), s2)
    return q, s8, s2, False


def _repack_lossless(p, codes, rel_k, nz, scale_2, i):
    o = p.shape[0]
    nb16 = -(-i // 16)
    rel = torch.where(nz, rel_k, torch.zeros_like(rel_k))  # all-zero 32-blocks: block scale 1.0
    s16 = torch.ldexp(torch.ones_like(rel, dtype=torch.float32), rel).repeat_interleave(2, dim=1)[:, :nb16]
    s8 = s16.to(torch.float8_e4m3fn)  # exact: powers of two in [2^-9, 2^8]
    if i % 16:
        packed = pack_nibbles(torch.nn.functional.pad(codes, (0, nb16 * 16 - i)))
    else:
        packed = p.clone()
    return packed.reshape(o, -1), s8, scale_2.clone(), True
