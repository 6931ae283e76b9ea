"""What a loader gets wrong with a valid checkpoint: warnings for `quantdeck validate`, never failures.

transformers (checked with 5.25 and compressed-tensors 0.20.1) loads a compressed-tensors NVFP4 DeepSeek MoE without
a warning and without missing keys, but it fuses the routed experts into `experts.gate_up_proj` / `experts.down_proj`
parameters that compressed-tensors does not decompress: they hold the packed codes read as numbers (relative error
~10^4 against the source), while dense, shared-expert and attention Linears decode right. vLLM and SGLang read the
layout per expert and are right; so is a BF16 copy decoded by `quantdeck convert --to bf16`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.formats.nvfp4.names import find_nvfp4
from engine.models.base import Kind

__all__ = ["LoaderWarning", "loader_warnings"]


@dataclass(frozen=True)
class LoaderWarning:
    msg: str
    at: str
    hint: str


def _routed_experts(layout, bases: list[str]) -> list[str]:
    if layout is None:
        return [b for b in bases if ".experts." in b]
    return [b for b in bases if layout.classify(b + ".weight").kind is Kind.ROUTED_EXPERT]


def loader_warnings(directory: Path, config: dict[str, Any], names: set[str], nv: list[str],
                    layout) -> list[LoaderWarning]:
    """Warnings for an output whose NVFP4 modules `nv` (bases) a common loader reads wrongly."""
    ct = [b for b in nv if (s := find_nvfp4(b, names)) is not None and s.names.reciprocal]
    experts = _routed_experts(layout, ct)
    if not experts:
        return []
    return [LoaderWarning(
        f"{len(experts)} routed expert module(s) in compressed-tensors NVFP4 (e.g. {experts[0]}): transformers "
        "(AutoModelForCausalLM.from_pretrained, checked with transformers 5.25 and compressed-tensors 0.20.1) loads "
        "them without a warning, but its fused experts then hold the packed bytes, not the weights; dense and "
        "shared-expert layers load right",
        str(directory / "config.json"),
        "serve it with vLLM or SGLang, or decode it with `quantdeck convert --src OUT --to bf16` before loading it "
        "with transformers (lm-eval's HF backend, for one)")]
