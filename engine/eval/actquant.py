"""Activations quantized as the serving engines quantize them, then dequantized (fake quantization), in pure torch.

* NVFP4 (W4A4), as vLLM's `scaled_fp4_quant` kernel does it: with the global scale g (1/input_scale), per
  16-element block of the last dim a float8_e4m3fn block scale `sf = e4m3(g · (block_amax · fp32(1/6)))`
  (saturating at 448; 0 stays 0), elements multiplied by `1 / (sf · fp32(1/g))` and rounded to E2M1 (nearest,
  ties to even, saturating at 6), then dequantized as the GEMM's epilogue does: `code · sf · input_scale`.
* FP8 block (DeepSeek's dynamic activation scheme): per token, per group of 128 along the last dim,
  `scale = max(group_amax, 1e-10) / 448`, values cast to float8_e4m3fn after dividing by it (vLLM's
  `per_token_group_quant_fp8`).

Both return values in the input's dtype, so the layer's own BF16 GEMM then computes what the low-precision GEMM
computes (up to the order of its accumulation). `install` puts them in front of a decoder layer's Linears and its
routed experts.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from engine.calibrate.fastexperts import expert_groups
from engine.formats.e2m1 import decode_e2m1, e2m1_codes
from engine.formats.grid import E2M1_MAX, E4M3_MAX, NVFP4_BLOCK

FP8_GROUP = 128
FP8_EPS = 1e-10

__all__ = ["ActQuant", "fake_quant_fp8_group", "fake_quant_nvfp4", "install"]


def _groups(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """x in float32 as [rows, groups, size] along its last dim, zero-padded to a whole group; and the padding."""
    pad = (-x.shape[-1]) % size
    xf = x.to(torch.float32)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(-1, xf.shape[-1] // size, size), pad


def fake_quant_nvfp4(x: torch.Tensor, global_scale: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x quantized to NVFP4 with the global scale `global_scale` (g, what quantizes) and dynamic block scales, and
    dequantized with `input_scale` (what the GEMM multiplies by; 1/g within a float32 ulp)."""
    shape, dtype, n = x.shape, x.dtype, x.shape[-1]
    xb, pad = _groups(x, NVFP4_BLOCK)
    g = global_scale.to(device=x.device, dtype=torch.float32)
    sixth = torch.tensor(1.0 / E2M1_MAX, dtype=torch.float32, device=x.device)
    sf = (g * (xb.abs().amax(dim=-1) * sixth)).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.where(sf != 0, 1.0 / (sf * (1.0 / g)), torch.zeros_like(sf))
    codes = e2m1_codes(xb * scale.unsqueeze(-1))
    per_block = sf * input_scale.to(device=x.device, dtype=torch.float32)
    vals = decode_e2m1(codes) * per_block.unsqueeze(-1)
    vals = vals.reshape(*shape[:-1], n + pad)
    return (vals[..., :n] if pad else vals).to(dtype)


def fake_quant_fp8_group(x: torch.Tensor, group: int = FP8_GROUP) -> torch.Tensor:
    """x quantized to float8_e4m3fn per token in groups of `group` along the last dim (dynamic scales)."""
    shape, dtype, n = x.shape, x.dtype, x.shape[-1]
    xg, pad = _groups(x, group)
    scale = xg.abs().amax(dim=-1, keepdim=True).clamp_min(FP8_EPS) / E4M3_MAX
    q = (xg / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale
    q = q.reshape(*shape[:-1], n + pad)
    return (q[..., :n] if pad else q).to(dtype)


@dataclass(frozen=True)
class ActQuant:
    """How one GEMM's input is quantized: `kind` "nvfp4" (with its global input scale) or "fp8-group"."""

    kind: str
    global_scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "nvfp4":
            return fake_quant_nvfp4(x, self.global_scale, self.input_scale)
        return fake_quant_fp8_group(x)


@dataclass(frozen=True)
class ExpertsActQuant:
    """The routed experts' two GEMMs: gate‖up input (`w13`) and down input (`w2`), one scale each for all experts
    (None: not quantized)."""

    w13: ActQuant | None = None
    w2: ActQuant | None = None


def install(layer: torch.nn.Module, linears: dict[str, ActQuant], experts: dict[str, ExpertsActQuant]) -> None:
    """Quantize the inputs of `layer`'s Linears (relative module name → ActQuant) and of its fused routed experts
    (relative name of the experts module → ExpertsActQuant)."""
    for name, q in linears.items():
        mod = layer.get_submodule(name)
        mod.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]), *args[1:]))
    for name, q in experts.items():
        mod = layer.get_submodule(name)
        mod.forward = types.MethodType(_experts_forward(q), mod)


def _experts_forward(q: ExpertsActQuant):
    """transformers' eager fused-experts loop (DeepseekV3Experts.forward), with each GEMM's input quantized. The
    gate‖up input is quantized once for all experts: one global scale and per-token blocks give every expert the
    same rows."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        xq = q.w13(hidden_states) if q.w13 is not None else hidden_states
        # the experts hit and their tokens in the eager loop's order, with one host sync instead of two an expert
        for e, tok, pos in expert_groups(top_k_index, self.num_experts):
            gate, up = torch.nn.functional.linear(xq[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            h = torch.nn.functional.linear(q.w2(h) if q.w2 is not None else h, self.down_proj[e])
            h = h * top_k_weights[tok, pos, None]
            final.index_add_(0, tok, h.to(final.dtype))
        return final

    return forward
