"""How to build and feed one transformers decoder layer of a model family, from checkpoint tensors.

A `LayerFamily` knows, for one model family: the transformers config / decoder-layer / rotary classes,
how to turn a batch of token ids into what the first layer receives (embeddings) and the keyword
arguments every layer receives (rotary position embeddings, the causal mask, position ids), and
which checkpoint tensors fill each parameter of layer i (fused experts are stacked here, FP8
weights are dequantized by the loader). It mirrors what `<Family>Model.forward` does before its
layer loop, so a layer fed this way sees exactly what it sees inside the whole model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from engine.errors import CheckpointError
from engine.registry import Registry

GetTensor = Callable[[str], torch.Tensor]  # checkpoint name -> tensor in the compute dtype


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

    # --- weights ----------------------------------------------------------------------------------
    @classmethod
    def load_param(cls, i: int, pname: str, get: GetTensor, names: set[str]) -> torch.Tensor:
        """The tensor for parameter `pname` (relative to layer i) from the checkpoint."""
        full = cls.layer_prefix(i) + pname
        if full in names:
            return get(full)
        raise CheckpointError(f"tensor {full} not found in the checkpoint", at=full,
                              hint="is this the checkpoint the config describes?")


@LayerFamily.register("deepseek-v3")
class DeepseekV3Family(LayerFamily):
    model_types = ("deepseek_v3",)

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

    _EXPERT = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")

    @classmethod
    def load_param(cls, i: int, pname: str, get: GetTensor, names: set[str]) -> torch.Tensor:
        m = cls._EXPERT.match(pname)
        if not m:
            return super().load_param(i, pname, get, names)
        pre = cls.layer_prefix(i) + "mlp.experts."
        n = 0
        while f"{pre}{n}.down_proj.weight" in names:
            n += 1
        if n == 0:
            raise CheckpointError(f"no experts under {pre}* in the checkpoint", at=pre)
        if m.group(1) == "down_proj":
            return torch.stack([get(f"{pre}{e}.down_proj.weight") for e in range(n)])
        return torch.stack([torch.cat([get(f"{pre}{e}.gate_proj.weight"), get(f"{pre}{e}.up_proj.weight")], dim=0)
                            for e in range(n)])
