"""validate's tolerances and its torch reference decoder (`decode_module`), which the host decoders of
engine.convert.validate_read are held to; shared by validate, its source comparison (validate_source) and its
decoder-block check (block_check). torch and the formats' references are imported on the first decode: validate's
host path runs without them."""

from __future__ import annotations

from engine.checkpoint.reader import CheckpointReader
from engine.convert import validate_read as host
from engine.formats.grid import infer_block

# Relative-error ceilings per encoding (random Gaussian weights give ~0.09 for NVFP4, ~0.02 for FP8).
REL_TOL = {"nvfp4": 0.2, "fp8-block": 0.06, "bf16": 0.01}
# Decoder block: ||Δ_out − Δ_src|| / ||Δ_src|| with Δ = layer(x) − x.
BLOCK_TOL = {"nvfp4": 0.2, "fp8-block": 0.1, "bf16": 0.02, "none": 0.02}
# BLOCK_TOL["nvfp4"] holds for the three MLP matrices a weight-only NVFP4 run quantizes in a dense layer 0. Each
# quantized matrix adds an independent error of ~0.09, so the ceiling grows with the square root of their number:
# a W4A4 export also quantizes the five attention matrices (DeepSeek-V3 layer 0 at real width: 0.215 for a correct
# output). Routed experts run side by side, not in series: they count as one expert's three.
NVFP4_BLOCK_MATRICES = 3


def block_tol(target: str, names) -> float:
    """The decoder-block ceiling for `target` given the tensor names of the output's layer 0."""
    tol = BLOCK_TOL.get(target, 0.02)
    if target != "nvfp4":
        return tol
    mods = {n.rsplit(".", 1)[0] for n in names if n.endswith((".weight_scale_2", ".weight_global_scale"))}
    n = sum(1 for m in mods if ".experts." not in m) + (3 if any(".experts." in m for m in mods) else 0)
    return round(tol * max(1.0, n / NVFP4_BLOCK_MATRICES) ** 0.5, 3)


def sampled_rows(n: int):
    """The sampled rows (engine.convert.validate_read.sample_rows) as a torch index."""
    import torch

    return torch.from_numpy(host.sample_rows(n))


def decode_module(r: CheckpointReader, base: str, rows=None, cols: int | None = None, device=None):
    """fp32 values of module `base` in any encoding quantdeck reads or writes (None: no such module); the torch
    reference of validate's host decoders. `device`: where the stored tensors go before they are decoded (the
    same float32 products there: one rounding each)."""
    import torch

    from engine.formats.fp8_block.helpers import dequant_fp8_block
    from engine.formats.mxfp4.helpers import dequant_mxfp4
    from engine.formats.nvfp4.helpers import dequant_nvfp4

    if device is not None:
        r = _OnDevice(r, device)
    w = base + ".weight"
    if base + ".weight_scale_2" in r or base + ".weight_global_scale" in r:
        packed = r.get(w if w in r else base + ".weight_packed")
        bs = r.get(base + ".weight_scale")
        if base + ".weight_scale_2" in r:
            s2 = r.get(base + ".weight_scale_2").float().reshape(())
        else:
            s2 = 1.0 / r.get(base + ".weight_global_scale").float().reshape(())
        if rows is not None:
            packed, bs = packed[rows], bs[rows]
        shape = (packed.shape[0], cols) if cols else None
        return dequant_nvfp4(packed, bs, s2, shape)
    if w not in r:
        return None
    t = r.get(w)
    if t.dtype == torch.float8_e4m3fn:
        for sc in (base + ".weight_scale_inv", base + ".scale"):
            if sc in r:
                s = r.get(sc)
                out = dequant_fp8_block(t, s, infer_block(tuple(t.shape), tuple(s.shape)))
                return out[rows] if rows is not None else out
        return t.float()[rows] if rows is not None else t.float()
    if t.dtype in (torch.uint8, torch.int8) and base + ".scale" in r:
        out = dequant_mxfp4(t, r.get(base + ".scale"))
        return out[rows] if rows is not None else out
    t = t.float()
    return t[rows] if rows is not None and t.dim() >= 1 else t


class _OnDevice:
    """A reader whose tensors come on `device` (decode_module's `device`)."""

    def __init__(self, r: CheckpointReader, device):
        self.r, self.device = r, device

    def __contains__(self, name: str) -> bool:
        return name in self.r

    def get(self, name: str):
        return self.r.get(name).to(self.device)
