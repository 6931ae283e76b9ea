"""Which layout a checkpoint uses, and whether its config and its tensors agree.

The family comes from config.json's `model_type`; when the config is missing or says something the tensor
names contradict (V4-native names under a V3 model_type, say), the names win.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from engine.core.names import Family
from engine.models.base import ModelLayout, Role, config_experts, config_layers, layer_index
from engine.models.generic import GenericLayout

_MODEL_TYPES = {
    "deepseek_v3": Family.DEEPSEEK_V3,
    "deepseek_v32": Family.DEEPSEEK_V3,
    "deepseek_r1": Family.DEEPSEEK_V3,
    "kimi_k2": Family.DEEPSEEK_V3,
    "deepseek_v4": Family.DEEPSEEK_V4,
}
_V4_MARKERS = (".attn.wq_a.", ".attn.wkv.", ".ffn.experts.", ".ffn.shared_experts.", "hc_attn_fn")
_V3_MARKERS = (".self_attn.kv_a_proj_with_mqa.", ".mlp.gate.e_score_correction_bias", ".self_attn.kv_b_proj.")


def family_from_config(config: dict) -> Family | None:
    mt = str(config.get("model_type") or "").lower()
    if mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    archs = " ".join(config.get("architectures") or []).lower()
    if "deepseekv4" in archs:
        return Family.DEEPSEEK_V4
    if "deepseekv3" in archs:
        return Family.DEEPSEEK_V3
    return None


def family_from_names(names: Iterable[str]) -> Family | None:
    names = list(names)
    if any(m in n for n in names for m in _V4_MARKERS):
        return Family.DEEPSEEK_V4
    if any(m in n for n in names for m in _V3_MARKERS):
        return Family.DEEPSEEK_V3
    return None


def detect_family(config: dict, names: Iterable[str]) -> Family:
    names = list(names)
    by_names = family_from_names(names)
    by_config = family_from_config(config or {})
    if by_names is not None:
        return by_names
    return by_config or Family.GENERIC


def detect_layout(config: dict | None, names: Iterable[str]) -> ModelLayout:
    """The layout for a checkpoint's config.json dict and tensor names."""
    names = list(names)
    config = dict(config or {})
    family = detect_family(config, names)
    if family is Family.DEEPSEEK_V3 and config_layers(config) is None:
        # no config: the first layer holding MTP's eh_proj is where MTP starts
        mtp = [layer_index(n) for n in names if n.endswith(".eh_proj.weight")]
        if mtp and None not in mtp:
            config["num_hidden_layers"] = min(mtp)  # type: ignore[type-var]
    if family is Family.GENERIC:
        has_scale = any(n.endswith(".scale") and n[:-6] + ".weight" in set(names) for n in names)
        suffix = ".scale" if has_scale else ".weight_scale_inv"
        return GenericLayout(config, scale_suffix=suffix)
    return ModelLayout.get(family)(config)


@dataclass(frozen=True)
class Mismatch:
    """A disagreement between config.json and the tensors; `at` names the config key or the tensor."""

    msg: str
    at: str
    hint: str = ""


def tensor_layers(layout: ModelLayout, names: Iterable[str]) -> tuple[set[int], set[int]]:
    """(main decoder layers, MTP layers) that the tensor names hold."""
    main, mtp = set(), set()
    for n in names:
        info = layout.classify(n)
        if info.layer is None:
            continue
        (mtp if info.mtp else main).add(info.layer)
    return main, mtp


def tensor_experts(layout: ModelLayout, names: Iterable[str]) -> dict[int, set[int]]:
    """Layer → routed expert indices present (main layers and MTP layers alike)."""
    out: dict[int, set[int]] = defaultdict(set)
    for n in names:
        info = layout.classify(n)
        if info.expert is not None and info.layer is not None:
            out[info.layer].add(info.expert)
    return dict(out)


def config_mismatches(layout: ModelLayout, names: Iterable[str]) -> list[Mismatch]:
    """Where config.json and the tensor names disagree on layers, experts or MTP layers."""
    names = list(names)
    out: list[Mismatch] = []
    cfg = layout.config
    n_layers, n_experts = config_layers(cfg), config_experts(cfg)
    main, mtp = tensor_layers(layout, names)
    if n_layers is not None and main:
        want = set(range(n_layers))
        if main != want:
            missing = sorted(want - main)
            extra = sorted(main - want)
            bits = []
            if missing:
                bits.append(f"missing layers {_span(missing)}")
            if extra:
                bits.append(f"unexpected layers {_span(extra)}")
            out.append(Mismatch(f"config num_hidden_layers={n_layers} but tensors hold layers "
                                f"{_span(sorted(main))} ({'; '.join(bits)})", at="config.json:num_hidden_layers",
                                hint="the checkpoint is incomplete or config.json belongs to another model"))
    n_mtp = cfg.get("num_nextn_predict_layers")
    if isinstance(n_mtp, int) and mtp and len(mtp) > n_mtp:
        out.append(Mismatch(f"config num_nextn_predict_layers={n_mtp} but tensors hold {len(mtp)} MTP layer(s)",
                            at="config.json:num_nextn_predict_layers"))
    if n_experts is not None:
        for layer, experts in sorted(tensor_experts(layout, names).items()):
            if experts != set(range(n_experts)):
                missing = sorted(set(range(n_experts)) - experts)
                extra = sorted(experts - set(range(n_experts)))
                what = f"missing experts {_span(missing)}" if missing else f"unexpected experts {_span(extra)}"
                out.append(Mismatch(f"config n_routed_experts={n_experts} but layer {layer} has "
                                    f"{len(experts)} experts ({what})", at=f"layer {layer} experts",
                                    hint="a shard may be missing, or config.json belongs to another model"))
    return out


def role_counts(layout: ModelLayout, names: Iterable[str]) -> dict[str, int]:
    counts = {r.value: 0 for r in Role}
    for n in names:
        counts[layout.classify(n).role.value] += 1
    return counts


def _span(xs: list[int]) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8'."""
    if not xs:
        return "none"
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if x is not None:
            start = prev = x
    return ",".join(parts)
