"""Activation scales from an amax snapshot: per checkpoint module, fused groups shared, siblings filled.

Snapshot keys are modelopt quantizer names in the transformers model. They map onto checkpoint modules:

    P.weight_quantizer.amax / P.input_quantizer.amax                  -> module P
    L.mlp.experts.gate_up_proj_weight_quantizers.E.amax               -> L.mlp.experts.E.gate_proj / .up_proj
    L.mlp.experts.gate_up_proj_input_quantizer.amax (shared)          -> every L.mlp.experts.E.gate_proj / .up_proj
    L.mlp.experts.down_proj_weight_quantizers.E.amax / down_proj_input_quantizer.amax -> L.mlp.experts.E.down_proj

`input_scale = amax / (6 · 448)`. Members of a fused group take the group's max. An expert whose input
amax is missing or zero (it saw no token) takes the max of its siblings' for the same projection in the
same layer, and is listed. A scale that is still zero, negative or non-finite is an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from engine.core.errors import ValidationFailedError

FP4_MAX, E4M3_MAX = 6.0, 448.0
_FUSED_W = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj|up_proj)_weight_quantizers\.(\d+)\.amax$")
_FUSED_I = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj|up_proj)_input_quantizer\.amax$")
_PLAIN = re.compile(r"^(.*)\.(weight|input)_quantizer\.amax$")
_EXPERT_MOD = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)$")
_SPLIT = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "up_proj": ("up_proj",)}


@dataclass
class ModuleAmax:
    weight: dict[str, float] = field(default_factory=dict)  # checkpoint module -> weight amax
    input: dict[str, float] = field(default_factory=dict)  # checkpoint module -> input amax
    shared_input: dict[str, float] = field(default_factory=dict)  # "L.mlp.experts|gate_proj" -> amax for all experts


def module_amax(amax: dict[str, torch.Tensor]) -> ModuleAmax:
    """Snapshot keys (modelopt quantizer names) -> amax per checkpoint module."""
    out = ModuleAmax()
    for key, t in amax.items():
        v = float(t.float().max()) if t.numel() else float("nan")
        if m := _FUSED_W.match(key):
            for proj in _SPLIT[m.group(2)]:
                out.weight[f"{m.group(1)}.{m.group(3)}.{proj}"] = v
        elif m := _FUSED_I.match(key):
            for proj in _SPLIT[m.group(2)]:
                out.shared_input[f"{m.group(1)}|{proj}"] = v
        elif m := _PLAIN.match(key):
            (out.weight if m.group(2) == "weight" else out.input)[m.group(1)] = v
    return out


def input_scale(amax: float) -> float:
    return float(torch.tensor(amax, dtype=torch.float32) / (FP4_MAX * E4M3_MAX))


@dataclass
class ScalePlan:
    input_amax: dict[str, float]  # module -> input amax after sharing and sibling fill
    filled: dict[str, str] = field(default_factory=dict)  # expert module -> why / from what
    missing: list[str] = field(default_factory=list)  # quantized modules with no usable amax at all

    def scale(self, module: str) -> torch.Tensor:
        return torch.tensor(self.input_amax[module], dtype=torch.float32) / (FP4_MAX * E4M3_MAX)


def _usable(v: float | None) -> bool:
    return v is not None and math.isfinite(v) and v > 0


def plan_input_scales(quantized: list[str], groups: dict[str, list[str]], ma: ModuleAmax) -> ScalePlan:
    """Input amax for every quantized module: own, shared-experts, fused-group max, sibling fill."""
    raw: dict[str, float | None] = {}
    for mod in quantized:
        v = ma.input.get(mod)
        if v is None and (m := _EXPERT_MOD.match(mod)):
            v = ma.shared_input.get(f"{m.group(1)}|{m.group(3)}")
        raw[mod] = v
    sp = ScalePlan(input_amax={})
    # siblings: same experts container and projection
    sibs: dict[str, list[str]] = {}
    for mod in quantized:
        if m := _EXPERT_MOD.match(mod):
            sibs.setdefault(f"{m.group(1)}|{m.group(3)}", []).append(mod)
    for mod in quantized:
        v = raw[mod]
        if not _usable(v) and (m := _EXPERT_MOD.match(mod)):
            vals = [raw[s] for s in sibs[f"{m.group(1)}|{m.group(3)}"] if _usable(raw[s])]
            if vals:
                v = max(vals)
                sp.filled[mod] = f"no tokens: siblings' max {v:.6g}"
        if _usable(v):
            sp.input_amax[mod] = float(v)
        else:
            sp.missing.append(mod)
    for members in groups.values():
        present = [m for m in members if m in sp.input_amax]
        if present:
            top = max(sp.input_amax[m] for m in present)
            for m in present:
                sp.input_amax[m] = top
    return sp


def check_scales(sp: ScalePlan) -> None:
    if sp.missing:
        raise ValidationFailedError(
            f"{len(sp.missing)} quantized module(s) have no usable activation amax, e.g. {sp.missing[:3]}",
            at=sp.missing[0], hint="the snapshot does not cover these modules: calibrate with the same "
            "--quant-cfg, or finish the calibration (quantdeck validate --amax)")
    for mod, a in sp.input_amax.items():
        s = a / (FP4_MAX * E4M3_MAX)
        if not (math.isfinite(s) and s > 0):
            raise ValidationFailedError(f"input_scale of {mod} would be {s}", at=mod)
