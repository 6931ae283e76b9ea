"""E2M1 (FP4) element codes shared by NVFP4 and MXFP4: rounding, packing two per byte, decoding.

Code = sign << 3 | index, index into {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Rounding follows modelopt's
`NVFP4QTensor._cast_fp4` exactly: index = number of bounds {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5} strictly
below |x| (torch.searchsorted, left), plus one when |x| is exactly 0.75, 1.75 or 3.5 — i.e. round to
nearest, ties to the even mantissa, saturating at 6. The sign bit is `x < 0`: -0.0 gets code 0, a small
negative value that rounds to zero gets code 8 (negative zero), as in modelopt.
Packing: element 2j in the low nibble, element 2j+1 in the high nibble of byte j (modelopt, compressed-tensors,
gpt-oss/DeepSeek MXFP4 alike).
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

__all__ = ["E2M1_BOUNDS", "E2M1_MAX", "E2M1_VALUES", "decode_e2m1", "decode_packed", "e2m1_codes", "pack_nibbles",
           "unpack_nibbles"]


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0..15) of float32 values already divided by their scale."""
    bounds = torch.tensor(E2M1_BOUNDS, dtype=torch.float32, device=x.device)
    sign = (x < 0).to(torch.uint8)
    a = x.abs()
    idx = torch.searchsorted(bounds, a.contiguous(), out_int32=True).to(torch.uint8)
    tie = (a == 0.75) | (a == 1.75) | (a == 3.5)
    return (sign << 3) | (idx + tie.to(torch.uint8))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] uint8 codes -> [..., n] bytes, even element in the low nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] uint8 codes (inverse of pack_nibbles)."""
    p = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 codes."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return lut[codes.long()]


_PAIRS: dict[torch.device, torch.Tensor] = {}


def _pairs(device: torch.device) -> torch.Tensor:
    """[256] int64: byte b's two float32 values (low nibble's first) as one 8-byte item, on `device`."""
    t = _PAIRS.get(device)
    if t is None:
        vals = torch.tensor(E2M1_VALUES, dtype=torch.float32, device="cpu")  # not a `with torch.device` default
        b = torch.arange(256, device="cpu")
        pairs = torch.stack((vals[b & 0x0F], vals[b >> 4]), dim=1).contiguous()
        t = _PAIRS[device] = pairs.view(torch.int64).reshape(256).to(device)
    return t


def decode_packed(packed: torch.Tensor) -> torch.Tensor:
    """float32 values [..., 2n] of packed bytes [..., n]: decode_e2m1(unpack_nibbles(packed)), bit for bit, with
    one lookup per byte (both values at once, int32 indices) instead of one per code: half the lookups and no
    int64 code tensor (1.8× faster on a CPU for an 18432 × 7168 matrix)."""
    p = packed.view(torch.uint8) if packed.dtype != torch.uint8 else packed
    out = _pairs(p.device).index_select(0, p.reshape(-1).to(torch.int32))
    return out.view(torch.float32).view(*p.shape[:-1], 2 * p.shape[-1])
