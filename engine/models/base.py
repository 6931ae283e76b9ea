"""What a tensor name means in a model family: the `ModelLayout` registry and the answer it gives.

A layout is built from a checkpoint's config.json (a dict) and never changes after: it answers, for one
tensor name (and optionally its shape), with a frozen `TensorInfo`: its role (quantize, preserve, a
scale companion, MTP), its kind, layer and expert indices, whether it is attention, and the key of the
fused group whose members share one global scale. Layouts are looked up by Family name:

    layout = ModelLayout.get(Family.DEEPSEEK_V3)(config)
    info = layout.classify("model.layers.3.mlp.experts.7.gate_proj.weight")
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar, Iterable, Sequence

from engine.core.names import Family, StrEnum
from engine.core.registry import Registry


class Role(StrEnum):
    """What a converter does with a tensor by default."""

    QUANTIZE = "quantize"  # a GEMM weight of the main model
    PRESERVE = "preserve"  # copied as it is (norms, router, embeddings, head, hc_*, compressor, indexer, ...)
    SCALE = "scale"  # a source-scale companion of another tensor (weight_scale_inv, V4 `.scale`)
    MTP = "mtp"  # belongs to a multi-token-prediction layer (kept in BF16 and excluded by default)


class Kind(StrEnum):
    """The part of the model a tensor belongs to."""

    ROUTED_EXPERT = "routed-expert"
    SHARED_EXPERT = "shared-expert"
    DENSE_MLP = "dense-mlp"
    ATTENTION = "attention"
    ROUTER = "router"
    NORM = "norm"
    EMBEDDING = "embedding"
    HEAD = "head"
    HC = "hc"  # V4 hyper-connection mixing (hc_attn_*, hc_ffn_*, hc_head_*)
    COMPRESSOR = "compressor"  # V4 CSA/HCA KV compressor
    INDEXER = "indexer"  # V4 lightning indexer
    ATTN_SINK = "attn-sink"
    TID2EID = "tid2eid"  # V4 hash-MoE token → expert table
    MTP_PROJ = "mtp-proj"  # MTP input projections (V3 eh_proj, V4 e_proj/h_proj)
    SCALE = "scale"
    OTHER = "other"  # not recognized: preserved, and inspect reports it


@dataclass(frozen=True)
class TensorInfo:
    name: str
    role: Role
    kind: Kind
    layer: int | None = None  # decoder layer; an MTP layer k counts as num_hidden_layers + k
    expert: int | None = None  # routed expert index
    attention: bool = False
    mtp: bool = False
    gemm: bool = False  # a GEMM weight a converter quantizes (attention and MTP ones only when asked)
    fused_group: str | None = None  # members share one global scale; attention only with quantize_attention
    proj: str | None = None  # short projection name: gate_proj, w1, q_a_proj, wq_a, ...
    weight: str | None = None  # for a scale companion: the weight it scales

    @property
    def quantize(self) -> bool:
        return self.role is Role.QUANTIZE

    def converted(self, *, quantize_attention: bool = False, include_mtp: bool = False) -> bool:
        """True when a converter with these options turns this tensor into the target format."""
        if not self.gemm or (self.mtp and not include_mtp):
            return False
        return quantize_attention or not self.attention


# Suffixes of the scale tensors that quantized checkpoints carry next to `<module>.weight`.
SOURCE_SCALE_SUFFIXES = (".weight_scale_inv", ".scale")
OUTPUT_QUANT_SUFFIXES = (
    ".weight_scale_2",
    ".weight_scale",
    ".input_scale",
    ".weight_global_scale",
    ".input_global_scale",
)


class ModelLayout(Registry):
    """Base of the registered model layouts. Instances are immutable: everything comes from `config`."""

    registry_kind = "model layout"
    family: ClassVar[Family]
    scale_suffix: ClassVar[str] = ".weight_scale_inv"  # the source-scale companion of `X.weight`

    def __init__(self, config: dict | None = None):
        self.config: dict = dict(config or {})

    # -- config -----------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int | None:
        return config_layers(self.config)

    @property
    def num_experts(self) -> int | None:
        return config_experts(self.config)

    @property
    def num_mtp_layers(self) -> int:
        return int(self.config.get("num_nextn_predict_layers") or 0)

    # -- per name -----------------------------------------------------------------------------------
    def classify(self, name: str, shape: Sequence[int] | None = None, *,
                 quantize_attention: bool = False) -> TensorInfo:
        """What `name` is. Scale companions (source `weight_scale_inv` / `.scale`, and the NVFP4 outputs'
        `weight_scale`, `weight_scale_2`, `input_scale`, global scales) answer with role SCALE and the
        weight they belong to; `X.weight_packed` answers like `X.weight`."""
        base = quant_companion_base(name)
        if base is not None:
            inner = self._classify(base, None, quantize_attention)
            return TensorInfo(name, Role.SCALE, Kind.SCALE, layer=inner.layer, expert=inner.expert,
                              attention=inner.attention, mtp=inner.mtp, weight=base, proj=inner.proj)
        if name.endswith(".weight_packed"):
            return replace(self._classify(name[: -len("_packed")], shape, quantize_attention), name=name)
        return self._classify(name, shape, quantize_attention)

    def _classify(self, name: str, shape: Sequence[int] | None, quantize_attention: bool) -> TensorInfo:
        raise NotImplementedError

    def should_quantize(
        self, name: str, shape: Sequence[int] | None = None, *, quantize_attention: bool = False,
        include_mtp: bool = False,
    ) -> bool:
        """True when a converter with these options turns this tensor into the target format."""
        info = self.classify(name, shape, quantize_attention=quantize_attention)
        return info.converted(quantize_attention=quantize_attention, include_mtp=include_mtp)

    def scale_name(self, weight_name: str) -> str:
        """The source-scale companion of a weight: `X.weight` → `X.weight_scale_inv` (V3) / `X.scale` (V4)."""
        return _strip_suffix(weight_name, ".weight") + self.scale_suffix

    def weight_of_scale(self, name: str) -> str | None:
        """The weight a scale companion belongs to, or None when `name` is not a source scale."""
        for suf in SOURCE_SCALE_SUFFIXES:
            if name.endswith(suf):
                return name[: -len(suf)] + ".weight"
        return None

    def is_mtp(self, name: str) -> bool:
        return self.classify(name).mtp

    def pattern(self, name: str) -> str:
        """The name with layer and expert indices collapsed: `model.layers.{L}.mlp.experts.{E}.up_proj.weight`;
        an MTP layer shows as `{MTP}`."""
        return collapse_indices(name, mtp=self.classify(name).mtp)


def _strip_suffix(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if name.endswith(suffix) else name


_LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")
_EXPERT_RE = re.compile(r"(^|\.)experts\.(\d+)\.")
_MTP_RE = re.compile(r"(^|\.)mtp\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(3)) if m else None


def expert_index(name: str) -> int | None:
    m = _EXPERT_RE.search(name)
    return int(m.group(2)) if m else None


def collapse_indices(name: str, *, mtp: bool = False) -> str:
    out = _EXPERT_RE.sub(lambda m: f"{m.group(1)}experts.{{E}}.", name)
    out = _MTP_RE.sub(lambda m: f"{m.group(1)}mtp.{{MTP}}.", out)
    tag = "{MTP}" if mtp else "{L}"
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}.{tag}.", out)


def config_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def config_experts(config: dict) -> int | None:
    for key in ("n_routed_experts", "num_local_experts", "num_experts", "n_experts"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def quant_companion_base(name: str) -> str | None:
    """For a quantization-parameter tensor (source scale or an NVFP4 output's), the `X.weight` it belongs to."""
    for suf in SOURCE_SCALE_SUFFIXES + OUTPUT_QUANT_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)] + ".weight"
    return None


def names_set(names: Iterable[str]) -> frozenset[str]:
    return names if isinstance(names, frozenset) else frozenset(names)
