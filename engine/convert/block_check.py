"""validate's decoder-block check (DeepSeek V3 and V4 families): layer 0 of the output and of the source, each
dequantized to fp32 and loaded into transformers' own decoder-layer class, run on the same random hidden states;
the outputs must agree.

We compare the layer's contribution Δ = layer(x) − x (the residual would hide errors):
rel = ||Δ_out − Δ_src|| / ||Δ_src|| ≤ block_tol(target, layer 0's names) (validate_ref.py states the numbers).

Only layer 0's tensors are read, decoded where the layer runs (a GPU where validate has one: its float32 products
are the host's), and the layer is built on the meta device and given them (as the calibration's layer reader
builds its layers): nothing is randomly initialized first. The check has two halves, the source's
(`source_side`, which a warm child prepares ahead of validate) and the output's (`output_side`); where it runs (a child
process, a warm child, or validate's own process) is engine.convert.block_child's business.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from engine.checkpoint.reader import CheckpointReader
from engine.convert.validate_ref import block_tol, decode_module
from engine.models import detect_layout

if TYPE_CHECKING:
    import torch

TOKENS = 16


def _layer_class(family: str, config: dict[str, Any]):
    if family == "deepseek-v4":
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mod

        cfg = DeepseekV4Config(**{k: v for k, v in config.items() if k not in ("quantization_config",)})
        cfg._experts_implementation = "eager"
        return cfg, mod.DeepseekV4DecoderLayer, mod.DeepseekV4RotaryEmbedding, None
    if family == "deepseek-v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as mod

        cfg = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("quantization_config",)})
        return cfg, mod.DeepseekV3DecoderLayer, mod.DeepseekV3RotaryEmbedding, "model.layers.0."
    return None


def _host_decoded(reader: CheckpointReader, wanted: dict[str, int], dev) -> dict[str, torch.Tensor]:
    """On a CPU, the NVFP4 and FP8-block modules of `wanted` (base -> columns) decoded by validate's host decoders
    (engine.convert.validate_modules.module_values: decode_module's values bit for bit, in C), a module to a
    thread; the torch reference takes what they leave, and every module on a GPU."""
    import torch

    from engine.convert import validate_read as host
    from engine.convert.validate_modules import module_values

    if torch.device(dev).type != "cpu" or not wanted:
        return {}
    files = host.Files()
    hr = host.HostReader(reader, files)
    try:
        with ThreadPoolExecutor(max(1, min(len(wanted), os.cpu_count() or 1)), thread_name_prefix="block") as ex:
            got = dict(zip(wanted, ex.map(lambda b: module_values(hr, b, wanted[b]), wanted), strict=True))
    finally:
        files.close()
    return {b: torch.from_numpy(v) for b, v in got.items() if v is not None}


def _state_dict(layer, reader: CheckpointReader, prefix: str, dev) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    refs = layer.state_dict()
    done = _host_decoded(reader, {prefix + k[: -len(".weight")]: r.shape[1] for k, r in refs.items()
                                  if k.endswith(".weight") and r.dim() == 2}, dev)
    for key, ref in refs.items():
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            parent = prefix + key.rsplit(".", 1)[0]
            mats = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
            sd[key] = _stack_experts(reader, ref, dev, [f"{parent}.{{e}}.{m}" for m in mats])
        elif key.endswith(".weight") and ref.dim() == 2:
            base = prefix + key[: -len(".weight")]
            sd[key] = done.pop(base) if base in done else decode_module(reader, base, cols=ref.shape[1], device=dev)
        else:
            sd[key] = reader.get(prefix + key).to(dev).float()
        if sd[key] is None or tuple(sd[key].shape) != tuple(ref.shape):
            raise KeyError(f"{prefix + key}: expected {list(ref.shape)}, found "
                           f"{None if sd[key] is None else list(sd[key].shape)}")
    return sd


_V4_EXPERT = ("experts.gate_up_proj", "experts.down_proj")


def _stack_experts(reader: CheckpointReader, ref, dev, bases: list[str]) -> torch.Tensor:
    """transformers' fused experts parameter (`ref`'s shape [experts, rows, cols]) in float32 on `dev`: expert e's
    matrices (`bases`, "{e}" standing for its index) decoded one at a time and stacked along their rows into it
    (one copy of the stack on the device, not its parts beside it)."""
    import torch

    out = torch.empty(tuple(ref.shape), dtype=torch.float32, device=dev)
    for e in range(ref.shape[0]):
        row = 0
        for base in (b.format(e=e) for b in bases):
            part = decode_module(reader, base, cols=ref.shape[2], device=dev)
            if part is None:
                raise KeyError(f"{base}: no such module in the checkpoint")
            if part.dim() != 2 or part.shape[1] != ref.shape[2] or row + part.shape[0] > ref.shape[1]:
                raise KeyError(f"{base}: expected rows of {ref.shape[2]} filling {list(ref.shape[1:])} with the "
                               f"expert's other matrices, found {list(part.shape)}")
            out[e, row: row + part.shape[0]] = part
            row += part.shape[0]
        if row != ref.shape[1]:
            raise KeyError(f"{bases[0].format(e=e)}: expected {ref.shape[1]} rows for expert {e}, found {row}")
    return out


def _v4_renames():
    """DeepSeek-native → transformers names, from transformers' own V4 checkpoint conversion mapping."""
    import re

    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    out = []
    for rule in get_checkpoint_conversion_mapping("deepseek_v4"):
        if type(rule).__name__ != "WeightRenaming":
            continue
        src = rule.source_patterns[0] if isinstance(rule.source_patterns, (list, tuple)) else rule.source_patterns
        dst = rule.target_patterns[0] if isinstance(rule.target_patterns, (list, tuple)) else rule.target_patterns
        out.append((re.compile(src), dst.replace("\\.", ".")))
    return out


def _v4_state_dict(layer, reader: CheckpointReader, dev) -> dict[str, torch.Tensor]:
    pre = "model.layers.0." if any(n.startswith("model.layers.0.") for n in reader.names()) else "layers.0."
    renames = _v4_renames()
    by_key: dict[str, str] = {}
    for n in reader.names():
        if not n.startswith(pre) or n.endswith((".scale", ".weight_scale", ".weight_scale_2", ".weight_global_scale",
                                                ".weight_scale_inv", ".input_scale")):
            continue
        key = "." + n[len(pre):].replace(".weight_packed", ".weight")
        for rx, dst in renames:
            key = rx.sub(dst, key)
        by_key[key[1:]] = n[: -len("_packed")] if n.endswith(".weight_packed") else n
    sd: dict[str, torch.Tensor] = {}
    for key, ref in layer.state_dict().items():
        if key.endswith(_V4_EXPERT):
            mats = ("w1", "w3") if key.endswith("gate_up_proj") else ("w2",)
            sd[key] = _stack_experts(reader, ref, dev, [f"{pre}ffn.experts.{{e}}.{m}" for m in mats])
        else:
            n = by_key.get(key)
            if n is None:
                raise KeyError(f"{pre}…: no tensor for transformers' {key}")
            if n.endswith(".weight") and ref.dim() == 2:
                sd[key] = decode_module(reader, n[: -len(".weight")], cols=ref.shape[1], device=dev)
            else:
                t = reader.get(n).to(dev)
                sd[key] = t.float() if ref.is_floating_point() else t.to(ref.dtype)
        if sd[key] is None or tuple(sd[key].shape) != tuple(ref.shape):
            raise KeyError(f"{key}: expected {list(ref.shape)}, found "
                           f"{None if sd[key] is None else list(sd[key].shape)}")
    return sd


def _run_v4(layer, rotary, x, cfg):
    import torch

    t = x.shape[1]
    h = x.unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()
    pos = torch.arange(t, device=x.device)[None]
    pe = {kind: rotary(x, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
    mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None]
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(1)).to(x.device)
    with torch.no_grad():
        out = layer(h, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=ids)
    return out - h


def _run(layer, rotary, x):
    import torch

    t = x.shape[1]
    pos = torch.arange(t, device=x.device)[None]
    cos, sin = rotary(x, pos)
    mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None]
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


def _materialize(layer_cls, cfg, sd: dict, dev):
    """transformers' layer holding `sd` (fp32), built on the meta device: no random initialization, no copy.
    Buffers the state dict does not hold (non-persistent ones) are built for real."""
    import torch

    with torch.device("meta"):
        layer = layer_cls(cfg, 0)
    layer.load_state_dict(sd, assign=True)
    leftovers = [n for n, b in layer.named_buffers() if b.is_meta]
    if leftovers:
        from transformers.initialization import no_init_weights

        with no_init_weights():
            real = layer_cls(cfg, 0)
        for n in leftovers:
            mod, _, attr = n.rpartition(".")
            (layer.get_submodule(mod) if mod else layer)._buffers[attr] = \
                (real.get_submodule(mod) if mod else real)._buffers[attr]
        del real
    return layer.float().to(dev).eval()


@dataclass
class SourceSide:
    """The source's half of the check, done once (a warm child prepares it before validate asks, and runs it when
    asked): `run_block(reader)`, layer 0 of a checkpoint run on the input, and the source layer's contribution
    `d_src` (None until `run_source`); or `skip`, why the check is not run at all."""

    skip: str | None = None
    layer_cls: Any = None
    where: str = ""
    run_block: Callable[[CheckpointReader], Any] | None = None
    d_src: Any = None


def source_side(src: CheckpointReader, device: str, *, run: bool = True) -> SourceSide:
    """The source's half: the reference layer's class imported, the device's context opened, and with `run`
    layer 0 of `src` run (`run_source`); a warm child started beside a conversion leaves the run for when validate
    asks, so that it reads the source then instead of competing with the conversion for the disk."""
    import torch

    from engine.formats.device import resolve_device

    family = str(detect_layout(src.config, src.names()).family)
    spec = _layer_class(family, src.config)
    if spec is None:
        return SourceSide("decoder-block run implemented for the deepseek-v3 and deepseek-v4 families; "
                           f"this is {family}")
    cfg, layer_cls, rope_cls, prefix = spec
    cfg._attn_implementation = "eager"
    dev = torch.device(resolve_device(device))
    x = torch.randn(1, TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dev)

    def run_block(reader: CheckpointReader) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.device("meta"):
            shape_of = layer_cls(cfg, 0)
        if prefix is None:  # V4: native names, hyper-connection streams, hash routing by token id
            layer = _materialize(layer_cls, cfg, _v4_state_dict(shape_of, reader, dev), dev)
            return _run_v4(layer, rope_cls(cfg).to(dev), x, cfg)
        layer = _materialize(layer_cls, cfg, _state_dict(shape_of, reader, prefix, dev), dev)
        return _run(layer, rope_cls(cfg).to(dev), x) - x

    side = SourceSide(None, layer_cls=layer_cls, where=(prefix or "layers.0.").rstrip("."), run_block=run_block)
    return run_source(side, src) if run else side


def run_source(side: SourceSide, src: CheckpointReader) -> SourceSide:
    """`side` with layer 0 of `src` run (`d_src`), once; a skip where the reference layer cannot run it."""
    if side.skip is not None or side.d_src is not None:
        return side
    assert side.run_block is not None
    try:  # the source first: a config the reference layer cannot run is no fault of the output
        d_src = side.run_block(src)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        return SourceSide(f"transformers' {side.layer_cls.__name__} cannot run layer 0 of the source either ({e}); "
                           "not checked")
    return replace(side, d_src=d_src)


def output_side(r: CheckpointReader, side: SourceSide, rep, target: str) -> None:
    import torch

    if side.skip is not None:
        rep.skip("block", side.skip)
        return
    layer_cls, where, d_src, run_block = side.layer_cls, side.where, side.d_src, side.run_block
    assert run_block is not None
    try:
        d_out = run_block(r)
    except (KeyError, RuntimeError, ValueError) as e:
        rep.fail("block", f"layer 0 cannot be built from the checkpoint: {e}", where)
        rep.row("block", "layer 0 not runnable")
        return
    rel = float((d_out - d_src).norm() / d_src.norm().clamp_min(1e-30))
    tol = block_tol(target, [n for n in r.names() if n.startswith((where + ".", "model." + where + "."))])
    if not bool(torch.isfinite(d_out).all()):
        rep.fail("block", "layer 0 output holds NaN/Inf", where)
    elif rel > tol:
        rep.fail("block", f"layer 0 output differs from the source's by {rel:.3f} (tolerance {tol})", where)
    rep.row("block", f"layer 0 ({layer_cls.__name__}, {TOKENS} tokens): rel. diff {rel:.4f} <= {tol}"
            if rel <= tol else f"layer 0 rel. diff {rel:.4f} > {tol}")


def check_first_block(r: CheckpointReader, src: CheckpointReader, rep, target: str, device: str = "cpu") -> None:
    """Layer 0 of `r` against layer 0 of `src` (the module docstring); findings go to `rep`."""
    output_side(r, source_side(src, device), rep, target)
