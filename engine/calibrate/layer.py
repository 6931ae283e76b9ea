"""Build one transformers decoder layer on a device from checkpoint tensors, dequantizing on the fly.

FP8 block weights (`weight` float8_e4m3fn + `weight_scale_inv`) are dequantized exactly with
engine.formats; everything lands in the compute dtype except the tensors transformers keeps in fp32
(`_keep_in_fp32_modules[_strict]`, e.g. the router's `e_score_correction_bias`), as `from_pretrained`
would leave them. Nothing of the layer is randomly initialized.
"""

from __future__ import annotations

import os
import torch

from engine.calibrate.family import LayerFamily
from engine.errors import CheckpointError

FP8_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


class TensorSource:
    """Checkpoint tensors by name, dequantized to the compute dtype (B's CheckpointReader underneath)."""

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype):
        from engine.checkpoint.reader import CheckpointReader

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
            from engine.formats.mxfp4.helpers import dequant_mxfp4

            t = dequant_mxfp4(t, self.reader.get(name[:-len("weight")] + "scale"))
        return t

    def _dequant_fp8(self, name: str, t: torch.Tensor) -> torch.Tensor:
        from engine.formats.fp8_block.helpers import dequant_fp8_block, infer_block

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


def _keep_fp32(family: type[LayerFamily], dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """What from_pretrained keeps in fp32: the strict list always, the other only for float16 models."""
    mc = family.model_class()
    out = list(getattr(mc, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        out += list(getattr(mc, "_keep_in_fp32_modules", None) or [])
    return out


def layer_tensors(family: type[LayerFamily], hf_config, i: int, src: TensorSource,
                  dtype: torch.dtype, pin: bool = False) -> dict[str, torch.Tensor]:
    """Layer `i`'s state dict, read and dequantized on the CPU in the dtypes `from_pretrained` would give;
    in page-locked memory with `pin` (the upload to a GPU is then asynchronous and at full speed).

    Runs on a prefetch thread while the device calibrates the previous layer."""
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in family.layer_class()(hf_config, i).state_dict().items()}
    keep = _keep_fp32(family, dtype)
    out: dict[str, torch.Tensor] = {}
    for pname, (shape, cur_dtype) in shapes.items():
        t = family.load_param(i, pname, src.get, src.names)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{family.layer_prefix(i)}{pname}: checkpoint shape {tuple(t.shape)} "
                                  f"!= model shape {shape}", at=family.layer_prefix(i) + pname,
                                  hint="does config.json match the weights?")
        want = torch.float32 if any(k in pname for k in keep) else (dtype if cur_dtype.is_floating_point else cur_dtype)
        out[pname] = t.to(want).contiguous()
        if pin:
            try:
                out[pname] = out[pname].pin_memory()
            except RuntimeError:  # page-locking refused: pageable, the upload just waits
                pin = False
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


def build_layer(family: type[LayerFamily], hf_config, i: int, src: TensorSource, device: torch.device,
                dtype: torch.dtype) -> torch.nn.Module:
    """Layer `i` of the model, on `device`, its tensors from the checkpoint."""
    return materialize_layer(family, hf_config, i, layer_tensors(family, hf_config, i, src, dtype), device)
