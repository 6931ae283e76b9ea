"""A decoder layer's surroundings: the checkpoint's tensors by name, the compute dtype, the tensors kept in
fp32, and the transformers layer module put around a built state dict.

Everything lands in the compute dtype except the tensors transformers keeps in fp32
(`_keep_in_fp32_modules[_strict]`, e.g. the router's `e_score_correction_bias`), as `from_pretrained`
would leave them. The layer's tensors themselves are read and built by engine.calibrate.layer_reader;
nothing of the layer is randomly initialized.
"""

from __future__ import annotations

import os

import torch

from engine.calibrate.family import LayerFamily
from engine.checkpoint.reader import CheckpointReader
from engine.core.errors import CheckpointError
from engine.formats.fp8_block.helpers import dequant_fp8_block, infer_block
from engine.formats.mxfp4.helpers import dequant_mxfp4

FP8_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


class TensorSource:
    """Checkpoint tensors by name (the embedding, for one), FP8 / MXFP4 dequantized on the host."""

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype):
        self.reader = CheckpointReader(model_dir)
        self.names = set(self.reader.names())
        self.dtype = dtype

    @property
    def config(self) -> dict:
        return self.reader.config

    def raw(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def get(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        if t.dtype in FP8_DTYPES:
            t = self._dequant_fp8(name, t)
        elif t.dtype in (torch.uint8, torch.int8) and name.endswith(".weight") \
                and (name[:-len("weight")] + "scale") in self.names:  # MXFP4: E2M1 pairs + E8M0 per 32
            t = dequant_mxfp4(t, self.reader.get(name[:-len("weight")] + "scale"))
        return t

    def _dequant_fp8(self, name: str, t: torch.Tensor) -> torch.Tensor:
        base = name[: -len("weight")] if name.endswith("weight") else name + "."
        for sname in (base + "weight_scale_inv", base + "scale"):
            if sname in self.names:
                s = self.reader.get(sname)
                return dequant_fp8_block(t, s, infer_block(tuple(t.shape), tuple(s.shape)))
        raise CheckpointError(f"FP8 tensor {name} has no scale ({base}weight_scale_inv)", at=name,
                              hint="the checkpoint is incomplete; re-download or re-convert it")

    def close(self) -> None:
        close = getattr(self.reader, "close", None)
        if close:
            close()


def compute_dtype(config: dict) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    if name not in ("bfloat16", "float16", "float32"):
        return torch.bfloat16  # FP8 / FP4 checkpoints compute in bf16
    return getattr(torch, name)


def keep_fp32(family: type[LayerFamily], dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """What from_pretrained keeps in fp32: the strict list always, the other only for float16 models."""
    mc = family.model_class()
    out = list(getattr(mc, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        out += list(getattr(mc, "_keep_in_fp32_modules", None) or [])
    return out


def materialize_layer(family: type[LayerFamily], hf_config, i: int, tensors: dict[str, torch.Tensor],
                      device: torch.device) -> torch.nn.Module:
    """The transformers layer on `device` holding `tensors` (built on the meta device: no extra copy)."""
    with torch.device("meta"):
        layer = family.layer_class()(hf_config, i)
    layer.load_state_dict({k: v.to(device, non_blocking=True) for k, v in tensors.items()}, strict=True, assign=True)
    leftovers = [n for n, b in layer.named_buffers() if b.is_meta]
    if leftovers:  # non-persistent buffers: build them for real (rare; none in DeepSeek V3 layers)
        from transformers.initialization import no_init_weights

        with torch.device(device), no_init_weights():
            real = family.layer_class()(hf_config, i)
        for n in leftovers:
            mod_name, _, attr = n.rpartition(".")
            src_mod = real.get_submodule(mod_name) if mod_name else real
            dst_mod = layer.get_submodule(mod_name) if mod_name else layer
            dst_mod._buffers[attr] = src_mod._buffers[attr]
        del real
    return layer.eval()
