"""validate's decoder-block check: layer 0 of the output and of the source, each dequantized to fp32 and loaded
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
        rep.skip("block", f"decoder-block run implemented for the deepseek-v3 family; this is {family}")
        return
    cfg, layer_cls, rope_cls, prefix = spec
    cfg._attn_implementation = "eager"
    dev = torch.device(device)
    try:
        torch.manual_seed(0)
        outs = []
        x = torch.randn(1, TOKENS, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dev)
        for reader in (r, src):
            layer = layer_cls(cfg, 0).float()
            layer.load_state_dict(_state_dict(layer, reader, prefix))
            layer.to(dev).eval()
            outs.append(_run(layer, rope_cls(cfg).to(dev), x) - x)
    except (KeyError, RuntimeError, ValueError) as e:
        rep.fail("block", f"layer 0 cannot be built from the checkpoint: {e}", prefix.rstrip("."))
        rep.row("block", "layer 0 not runnable")
        return
    d_out, d_src = outs
    rel = float((d_out - d_src).norm() / d_src.norm().clamp_min(1e-30))
    tol = BLOCK_TOL.get(target, 0.02)
    if not bool(torch.isfinite(d_out).all()):
        rep.fail("block", "layer 0 output holds NaN/Inf", prefix.rstrip("."))
    elif rel > tol:
        rep.fail("block", f"layer 0 output differs from the source's by {rel:.3f} (tolerance {tol})",
                 prefix.rstrip("."))
    rep.row("block", f"layer 0 ({layer_cls.__name__}, {TOKENS} tokens): rel. diff {rel:.4f} <= {tol}"
            if rel <= tol else f"layer 0 rel. diff {rel:.4f} > {tol}")
