"""validate's decoder-block check (DeepSeek V3 and V4 families): layer 0 of the output and of the source, each dequantized to fp32 and loaded
into transformers' own decoder-layer class, run on the same random hidden states; the outputs must agree.

We compare the layer's contribution Δ = layer(x) − x (the residual would hide errors):
rel = ||Δ_out − Δ_src|| / ||Δ_src|| ≤ BLOCK_TOL[target] (validate.py states the numbers).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.checkpoint.reader import CheckpointReader

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


def _state_dict(layer: torch.nn.Module, reader: CheckpointReader, prefix: str) -> dict[str, torch.Tensor]:
    from engine.convert.validate import decode_module

    sd: dict[str, torch.Tensor] = {}
    for key, ref in layer.state_dict().items():
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            parent = prefix + key.rsplit(".", 1)[0]
            parts = []
            for e in range(ref.shape[0]):
                if key.endswith("gate_up_proj"):
                    g = decode_module(reader, f"{parent}.{e}.gate_proj", cols=ref.shape[2])
                    u = decode_module(reader, f"{parent}.{e}.up_proj", cols=ref.shape[2])
                    parts.append(torch.cat([g, u], dim=0))
                else:
                    parts.append(decode_module(reader, f"{parent}.{e}.down_proj", cols=ref.shape[2]))
            sd[key] = torch.stack(parts)
        elif key.endswith(".weight") and ref.dim() == 2:
            sd[key] = decode_module(reader, prefix + key[: -len(".weight")], cols=ref.shape[1])
        else:
            sd[key] = reader.get(prefix + key).float()
        if sd[key] is None or tuple(sd[key].shape) != tuple(ref.shape):
            raise KeyError(f"{prefix + key}: expected {list(ref.shape)}, found "
                           f"{None if sd[key] is None else list(sd[key].shape)}")
    return sd


_V4_EXPERT = ("experts.gate_up_proj", "experts.down_proj")


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


def _v4_state_dict(layer: torch.nn.Module, reader: CheckpointReader) -> dict[str, torch.Tensor]:
    from engine.convert.validate import decode_module

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
            parts = []
            for e in range(ref.shape[0]):
                b = f"{pre}ffn.experts.{e}."
                if key.endswith("gate_up_proj"):
                    parts.append(torch.cat([decode_module(reader, b + "w1", cols=ref.shape[2]),
                                            decode_module(reader, b + "w3", cols=ref.shape[2])]))
                else:
                    parts.append(decode_module(reader, b + "w2", cols=ref.shape[2]))
            sd[key] = torch.stack(parts)
        else:
            n = by_key.get(key)
            if n is None:
                raise KeyError(f"{pre}…: no tensor for transformers' {key}")
            if n.endswith(".weight") and ref.dim() == 2:
                sd[key] = decode_module(reader, n[: -len(".weight")], cols=ref.shape[1])
            else:
                t = reader.get(n)
                sd[key] = t.float() if ref.is_floating_point() else t.to(ref.dtype)
        if sd[key] is None or tuple(sd[key].shape) != tuple(ref.shape):
            raise KeyError(f"{key}: expected {list(ref.shape)}, found "
                           f"{None if sd[key] is None else list(sd[key].shape)}")
    return sd


def _run_v4(layer, rotary, x: torch.Tensor, cfg) -> torch.Tensor:
    t = x.shape[1]
    h = x.unsqueeze(2).expand(-1, -1, cfg.hc_mult, -1).contiguous()
    pos = torch.arange(t, device=x.device)[None]
    pe = {kind: rotary(x, position_ids=pos, layer_type=kind) for kind in ("main", "compress")}
    mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None]
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=torch.Generator().manual_seed(1)).to(x.device)
    with torch.no_grad():
        out = layer(h, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=ids)
    return out - h


def _run(layer, rotary, x: torch.Tensor) -> torch.Tensor:
    t = x.shape[1]
    pos = torch.arange(t, device=x.device)[None]
    cos, sin = rotary(x, pos)
    mask = torch.full((t, t), float("-inf"), device=x.device).triu(1)[None, None]
    with torch.no_grad():
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


def check_first_block(r: CheckpointReader, src: CheckpointReader, rep, target: str, device: str = "cpu") -> None:
    from engine.convert.validate import BLOCK_TOL
    from engine.models import detect_layout

    family = str(detect_layout(src.config, src.names()).family)
    spec = _layer_class(family, src.config)
    if spec is None:
        rep.skip("block", f"decoder-block run implemented for the deepseek-v3 and deepseek-v4 families; this is {family}")
        return
    cfg, layer_cls, rope_cls, prefix = spec
    cfg._attn_implementation = "eager"
    where = (prefix or "layers.0.").rstrip(".")
    dev = torch.device(device)
    x = torch.randn(1, TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dev)

    def run_block(reader: CheckpointReader) -> torch.Tensor:
        torch.manual_seed(0)
        layer = layer_cls(cfg, 0).float()
        if prefix is None:  # V4: native names, hyper-connection streams, hash routing by token id
            layer.load_state_dict(_v4_state_dict(layer, reader))
            layer.to(dev).eval()
            return _run_v4(layer, rope_cls(cfg).to(dev), x, cfg)
        layer.load_state_dict(_state_dict(layer, reader, prefix))
        layer.to(dev).eval()
        return _run(layer, rope_cls(cfg).to(dev), x) - x

    try:  # the source first: a config the reference layer cannot run is no fault of the output
        d_src = run_block(src)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        rep.skip("block", f"transformers' {layer_cls.__name__} cannot run layer 0 of the source either ({e}); "
                          "not checked")
        return
    try:
        d_out = run_block(r)
    except (KeyError, RuntimeError, ValueError) as e:
        rep.fail("block", f"layer 0 cannot be built from the checkpoint: {e}", where)
        rep.row("block", "layer 0 not runnable")
        return
    rel = float((d_out - d_src).norm() / d_src.norm().clamp_min(1e-30))
    tol = BLOCK_TOL.get(target, 0.02)
    if not bool(torch.isfinite(d_out).all()):
        rep.fail("block", "layer 0 output holds NaN/Inf", where)
    elif rel > tol:
        rep.fail("block", f"layer 0 output differs from the source's by {rel:.3f} (tolerance {tol})", where)
    rep.row("block", f"layer 0 ({layer_cls.__name__}, {TOKENS} tokens): rel. diff {rel:.4f} <= {tol}"
            if rel <= tol else f"layer 0 rel. diff {rel:.4f} > {tol}")
