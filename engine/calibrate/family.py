"""How to build and feed one transformers decoder layer of a model family, from checkpoint tensors.

A `LayerFamily` knows, for one model family: the transformers config / decoder-layer / rotary classes,
how to turn a batch of token ids into what the first layer receives (embeddings) and the keyword
arguments every layer receives (rotary position embeddings, the causal mask, position ids), and
which checkpoint tensors fill each parameter of layer i (`source_map`; engine.calibrate.layer_plan turns
it into the pieces of each parameter, fused experts included). It mirrors what `<Family>Model.forward`
does before its layer loop, so a layer fed this way sees exactly what it sees inside the whole model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from engine.core.errors import CheckpointError
from engine.core.registry import Registry


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, s] long
    attention_mask: torch.Tensor  # [b, s] long, 1 = token, 0 = right padding

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


class LayerFamily(Registry):
    registry_kind: ClassVar[str] = "calibration family"
    registered_name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def for_config(cls, config: dict) -> type["LayerFamily"]:
        mt = config.get("model_type", "")
        for sub in cls._registry.values():
            if mt in sub.model_types:
                return sub
        known = ", ".join(t for s in cls._registry.values() for t in s.model_types)
        raise CheckpointError(f"model_type {mt!r} has no layer-streaming calibration", at="config.json:model_type",
                              hint=f"supported: {known}")

    # --- classes -----------------------------------------------------------------------------------
    @classmethod
    def hf_config(cls, config: dict):
        raise NotImplementedError

    @classmethod
    def layer_class(cls):
        raise NotImplementedError

    @classmethod
    def model_class(cls):
        raise NotImplementedError

    @classmethod
    def attn_implementation(cls) -> str:
        """What from_pretrained picks by default: sdpa where the model supports it, else eager."""
        return "sdpa" if getattr(cls.model_class(), "_supports_sdpa", False) else "eager"

    @classmethod
    def num_layers(cls, hf_config) -> int:
        return int(hf_config.num_hidden_layers)

    @classmethod
    def embed_name(cls) -> str:
        return "model.embed_tokens.weight"

    @classmethod
    def layer_prefix(cls, i: int) -> str:
        return f"model.layers.{i}."

    # --- feeding ----------------------------------------------------------------------------------
    @classmethod
    def make_rotary(cls, hf_config, device) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def initial_hidden(cls, hf_config, embeds: torch.Tensor) -> torch.Tensor:
        return embeds

    @classmethod
    def layer_kwargs(cls, hf_config, rotary, batch: Batch, embeds_like: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def fresh_cache(cls, hf_config):
        """A cache for one layer call where the family's attention behaves differently with one (the whole
        model makes a DynamicCache when use_cache is on, its default); None where it makes no difference."""
        return None

    # --- weights ----------------------------------------------------------------------------------
    model_type: ClassVar[str] = ""
    _maps: ClassVar[dict] = {}
    _EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
    _PROJ = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}

    @classmethod
    def renamings(cls) -> list:
        """transformers' own checkpoint renamings for this model type (its conversion mapping)."""
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
            from transformers.core_model_loading import WeightRenaming
        except ImportError:  # pragma: no cover - older transformers
            return []
        return [r for r in (get_checkpoint_conversion_mapping(cls.model_type) or []) if type(r) is WeightRenaming]

    @classmethod
    def source_map(cls, i: int, names: set[str]) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        """Layer i: model parameter (relative) -> checkpoint name, and (expert, gate|up|down) -> checkpoint name."""
        return cls._cached((cls.__name__, id(names), len(names), i), names, lambda: cls._source_map(i, names))

    @classmethod
    def _source_map(cls, i: int, names: set[str]) -> tuple[dict[str, str], dict[tuple[int, str], str]]:
        from transformers.core_model_loading import apply_renamings

        pat = re.compile(rf"^(?:model\.)?layers\.{i}\.(.+)$")
        renamings = cls.renamings()
        plain: dict[str, str] = {}
        experts: dict[tuple[int, str], str] = {}
        for n in cls._layer_names(names).get(i, ()):
            m = pat.match(apply_renamings(n, renamings))
            if not m:
                continue
            rel = m.group(1)
            if e := cls._EXPERT.match(rel):
                experts[(int(e.group(1)), cls._PROJ[e.group(2)])] = n
            else:
                plain[rel] = n
        return plain, experts

    @classmethod
    def _layer_names(cls, names: set[str]) -> dict[int, list[str]]:
        """The checkpoint's names by decoder layer index (`model.layers.<i>.` or `layers.<i>.`), one pass."""
        def by_layer() -> dict[int, list[str]]:
            by: dict[int, list[str]] = {}
            pat = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
            for n in names:
                if m := pat.match(n):
                    by.setdefault(int(m.group(1)), []).append(n)
            return by

        return cls._cached(("by-layer", id(names), len(names)), names, by_layer)

    @classmethod
    def _cached(cls, key: tuple, names: set[str], compute: Callable[[], Any]) -> Any:
        """compute() kept for the set `names` (its id in `key`): the set is kept with the value, so that while the
        entry lives no other set can take its id (a key of id alone could hand a collected set's map to a new one)."""
        hit = cls._maps.get(key)
        if hit is not None and hit[0] is names:
            return hit[1]
        value = compute()
        cls._maps[key] = (names, value)
        return value

    @classmethod
    def embed_source(cls, names: set[str]) -> str:
        from transformers.core_model_loading import apply_renamings

        for n in sorted(names):
            if apply_renamings(n, cls.renamings()) in ("model.embed_tokens.weight", "embed_tokens.weight"):
                return n
        raise CheckpointError("no embedding tensor (model.embed_tokens.weight) in the checkpoint",
                              at="model.embed_tokens.weight")


@LayerFamily.register("deepseek-v3")
class DeepseekV3Family(LayerFamily):
    model_types = ("deepseek_v3",)
    model_type = "deepseek_v3"

    @classmethod
    def hf_config(cls, config: dict):
        from transformers import DeepseekV3Config

        cfg = dict(config)
        cfg.pop("quantization_config", None)
        hf = DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")})
        return hf

    @classmethod
    def layer_class(cls):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

        return DeepseekV3DecoderLayer

    @classmethod
    def model_class(cls):
        from transformers import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM

    @classmethod
    def make_rotary(cls, hf_config, device):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

        with torch.device(device):
            return DeepseekV3RotaryEmbedding(config=hf_config)

    @classmethod
    def layer_kwargs(cls, hf_config, rotary, batch: Batch, embeds_like: torch.Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask

        dev = embeds_like.device
        position_ids = torch.arange(embeds_like.shape[1], device=dev).unsqueeze(0)
        mask = create_causal_mask(config=hf_config, inputs_embeds=embeds_like,
                                  attention_mask=batch.attention_mask.to(dev), past_key_values=None,
                                  position_ids=position_ids)
        return {"position_embeddings": rotary(embeds_like, position_ids), "attention_mask": mask,
                "position_ids": position_ids, "past_key_values": None, "use_cache": False}


@LayerFamily.register("deepseek-v4")
class DeepseekV4Family(LayerFamily):
    """V4: hyper-connection streams [b, s, hc_mult, d], two rotary tables, sliding-window mask, and the
    token ids (hash routing in the first layers) passed to every layer, as DeepseekV4Model.forward does."""

    model_types = ("deepseek_v4",)
    model_type = "deepseek_v4"

    @classmethod
    def hf_config(cls, config: dict):
        from transformers import DeepseekV4Config

        cfg = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "quantization_config")}
        return DeepseekV4Config(**cfg)

    @classmethod
    def layer_class(cls):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4DecoderLayer

        return DeepseekV4DecoderLayer

    @classmethod
    def model_class(cls):
        from transformers import DeepseekV4ForCausalLM

        return DeepseekV4ForCausalLM

    @classmethod
    def make_rotary(cls, hf_config, device):
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        with torch.device(device):
            return DeepseekV4RotaryEmbedding(hf_config)

    @classmethod
    def initial_hidden(cls, hf_config, embeds: torch.Tensor) -> torch.Tensor:
        return embeds.unsqueeze(2).expand(-1, -1, hf_config.hc_mult, -1).contiguous()

    @classmethod
    def layer_kwargs(cls, hf_config, rotary, batch: Batch, embeds_like: torch.Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_sliding_window_causal_mask

        dev = embeds_like.device
        position_ids = torch.arange(embeds_like.shape[1], device=dev).unsqueeze(0)
        mask = create_sliding_window_causal_mask(config=hf_config, inputs_embeds=embeds_like,
                                                 attention_mask=batch.attention_mask.to(dev), past_key_values=None,
                                                 position_ids=position_ids)
        pe = {"main": rotary(embeds_like, position_ids=position_ids, layer_type="main"),
              "compress": rotary(embeds_like, position_ids=position_ids, layer_type="compress")}
        return {"position_embeddings": pe, "position_ids": position_ids, "attention_mask": mask,
                "input_ids": batch.input_ids.to(dev), "past_key_values": None}

    @classmethod
    def fresh_cache(cls, hf_config):
        from transformers import DynamicCache

        return DynamicCache(config=hf_config)
