"""Tiny real DeepSeek checkpoints for calibration/export tests: transformers models saved with
save_pretrained, plus a real byte-level tokenizer (with a chat template) saved beside them."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token=None, pad_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def v3_config(**kw):
    from transformers import DeepseekV3Config

    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    base.update(kw)
    return DeepseekV3Config(**base)


def build_v3(out: Path, seed: int = 0, **kw) -> Path:
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(v3_config(**kw)).to(torch.bfloat16).eval()
    with torch.no_grad():  # router bias non-zero so the e_score_correction_bias path matters
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.01)
    model.save_pretrained(str(out))
    save_tokenizer(out)
    return out


SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Calibration needs a handful of varied prompts, some longer than others, to see real activations.",
    "<|user|>What is NVFP4?\n<|assistant|>A 4-bit float format with FP8 block scales.",
    "def f(x):\n    return x * 2  # code is text too",
    "Numbers: 3.14159 2.71828 1.41421 and symbols !@#$%^&*()",
    "short",
]


def write_samples(path: Path, n: int | None = None) -> Path:
    path.write_text(json.dumps(SAMPLE_TEXTS[:n] if n else SAMPLE_TEXTS))
    return path


def reference_quantized_model(model_dir: Path, input_ids, batch_size: int, world_size: int = 1,
                              quant_cfg: str = "NVFP4_DEFAULT_CFG", device: str = "cpu"):
    """modelopt's whole-model flow on the same batches every rank would see: from_pretrained + mtq.quantize."""
    import contextlib
    import sys

    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoModelForCausalLM

    from engine.calibrate.batches import plan_batches
    from engine.calibrate.qconfig import resolve_quant_cfg

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).to(device).eval()
    batches = [b for r in range(world_size) for b in plan_batches(input_ids, batch_size, world_size, r, 0)]

    def loop(m):
        for b in batches:
            m(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))

    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        mtq.quantize(model, resolve_quant_cfg(quant_cfg), loop)
    return model


def assert_amax_equal(ref: dict, got: dict, rel: float = 1e-5) -> None:
    assert set(ref) == set(got), (sorted(set(ref) - set(got))[:5], sorted(set(got) - set(ref))[:5])
    for k in ref:
        a, b = ref[k].float().cpu(), got[k].float().cpu()
        err = float(((a - b).abs() / a.abs().clamp_min(1e-30)).max())
        assert err <= rel, f"{k}: {a} vs {b} (rel {err:.2e})"
