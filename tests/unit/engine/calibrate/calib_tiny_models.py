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
