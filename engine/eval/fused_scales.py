"""How the scales of GEMMs that a serving engine fuses are reduced (vLLM `process_weights_after_loading`), for the
output's layers decoded by engine.eval.decode:

* routed experts' gate/up (w1/w3, run as one `w13` GEMM): w1's weight global scale for both (a mismatch is a
  warning); one input scale for every expert, the max over all experts' w1/w3 (FlashInfer's global scale);
* routed experts' down (w2): its own weight global scale; one input scale, the max over every expert;
* merged Linears (dense and shared gate+up, q_a+kv_a): one weight global scale and one input scale, the max of
  the stored values (modelopt: the largest multiplier; compressed-tensors: the largest stored reciprocal, so the
  smallest multiplier).

FlashInfer's MoE backends share one input global scale over all experts (emulated here); vLLM's other MoE backends
keep one per expert (the max over its w1/w3), which gives the same figures whenever the experts' input scales agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.eval.actquant import ActQuant
from engine.formats.nvfp4.stored import as_multiplier

if TYPE_CHECKING:
    from engine.eval.decode import Stored

# Linears a serving engine runs as one merged GEMM (vLLM's MergedColumnParallelLinear in DeepSeek V2/V3)
MERGED = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
          ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"))


@dataclass(frozen=True)
class InputScale:
    """One stored input scale: `value` as stored, `reciprocal` where it is compressed-tensors' 1/input_scale."""

    value: torch.Tensor
    reciprocal: bool

    @property
    def global_scale(self) -> torch.Tensor:
        return self.value if self.reciprocal else 1.0 / self.value

    @property
    def multiplier(self) -> torch.Tensor:
        return 1.0 / self.value if self.reciprocal else self.value


def reduce_inputs(ins: list[InputScale], rule: str) -> InputScale:
    """Several input scales made one, as vLLM does: "max" of the multipliers (modelopt's merged Linears, every
    MoE) or "max-stored", the max of the stored values (compressed-tensors' merged Linears: the smallest
    multiplier)."""
    rec = ins[0].reciprocal
    vals = torch.stack([i.value for i in ins])
    if rule == "max-stored" or not rec:
        return InputScale(vals.amax(), rec)
    return InputScale(vals.amin(), rec)  # the largest multiplier of stored reciprocals


def experts_quant(kinds: set[str], inputs: list[InputScale]) -> ActQuant | None:
    """The routed experts' input quantization for one GEMM: FP8 groups, or NVFP4 with one input scale for every
    expert (the largest multiplier, FlashInfer's global scale), or none (weight-only)."""
    if kinds == {"fp8"}:
        return ActQuant("fp8-group")
    if not inputs:
        return None
    one = reduce_inputs(inputs, "max")
    return ActQuant("nvfp4", one.global_scale, one.multiplier)


def merged_scales(plain: dict[str, str], stored: dict[str, Stored], dev, device: torch.device, prefix: str,
                  warnings: list[str]) -> dict[str, tuple]:
    """module -> (weight scale_2, input scale) for the Linears vLLM merges, reduced as it reduces them (`plain`:
    the layer's parameter -> its decoded name, `stored`: decoded name -> how it is stored, `dev`: the layer's
    stored tensors on `device`; a merged group's differing global scales are a warning in `warnings`)."""
    res: dict[str, tuple] = {}
    for group in MERGED:
        members = [(m, stored.get(plain.get(m + ".weight", ""))) for m in group]
        if not all(s is not None and s.kind == "nvfp4" for _, s in members):
            continue
        names = members[0][1].nvfp4.names
        layout = names.layout
        pick = torch.amin if names.reciprocal else torch.amax  # the largest stored value, as vLLM keeps
        s2s = torch.stack([weight_scale_2(s, dev, device) for _, s in members])
        s2 = pick(s2s)
        if bool((s2s != s2s[0]).any()):
            warnings.append(f"{prefix}{{{','.join(group)}}}: merged GEMMs with "
                            f"different global scales ({', '.join(f'{float(x):.6g}' for x in s2s)}); read "
                            f"with the {'max' if pick is torch.amax else 'min'}, as vLLM does for {layout}")
        ins = [input_scale(s, dev, device) for _, s in members if s.nvfp4.input_scale]
        inp = reduce_inputs(ins, "max-stored") if len(ins) == len(members) else None
        for m, _ in members:
            res[m] = (s2, inp)
    return res


def weight_scale_2(s: Stored, dev, device: torch.device) -> torch.Tensor:
    """An NVFP4 weight's global scale as a multiplier, on `device`."""
    n = s.nvfp4
    return as_multiplier(n.global_scale, dev[n.global_scale], n.names.reciprocal).to(device)


def input_scale(s: Stored, dev, device: torch.device) -> InputScale:
    """A module's input scale as the kernels take it: the global scale that quantizes (modelopt: fp32(1/s) of
    the stored multiplier s, as vLLM computes it; compressed-tensors: the stored one) and the multiplier that
    dequantizes (modelopt: s; compressed-tensors: fp32(1/g))."""
    n = s.nvfp4
    t = as_multiplier(n.input_scale, dev[n.input_scale], False).to(device)
    return InputScale(t, n.names.reciprocal)


def multipliers(names: list[str], dev, reciprocal: bool, device: torch.device) -> torch.Tensor:
    """as_multiplier of each stored one-value scale in `names`, as one float32 vector on `device` (one
    host sync for the check; the first bad scale raises as_multiplier's own error)."""
    v = torch.stack([dev[t].detach().to(torch.float32).reshape(()) for t in names]).to(device)
    ok = torch.isfinite(v) & (v > 0)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0])
        as_multiplier(names[bad], dev[names[bad]], reciprocal)
    return (1.0 / v) if reciprocal else v
