"""Import modelopt DeepSeek example's `amax_dict_rank{r}-mp{w}.pt` (what its multi-node calibration writes).

Each rank's file holds `state_dict` entries with "amax" or "quant" in the key, in DeepSeek's native
names (`layers.3.ffn.experts.17.w1.input_quantizer._amax`, `layers.0.attn.wq_a.weight_quantizer._amax`);
tensor-parallel ranks hold slices, so ranks merge by max. Names map to the transformers model's names
(`model.layers.3.mlp.experts.17.gate_proj.input_quantizer.amax`): routed experts stay per expert.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import CheckpointError

if TYPE_CHECKING:
    import torch

FILE_RE = re.compile(r"^amax_dict_rank(\d+)-mp(\d+)\.pt$")
_RENAMES = [(r"^layers\.", "model.layers."), (r"\.ffn\.", ".mlp."), (r"\.attn\.", ".self_attn."),
            (r"\.w1\.", ".gate_proj."), (r"\.w3\.", ".up_proj."), (r"\.w2\.", ".down_proj."),
            (r"\.wq_a\.", ".q_a_proj."), (r"\.wq_b\.", ".q_b_proj."), (r"\.wq\.", ".q_proj."),
            (r"\.wkv_a\.", ".kv_a_proj_with_mqa."), (r"\.wkv_b\.", ".kv_b_proj."), (r"\.wo\.", ".o_proj."),
            (r"\._amax$", ".amax")]


def amax_dict_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_file() and FILE_RE.match(path.name):
        return [path]
    if not path.is_dir():
        return []
    files = sorted((p for p in path.iterdir() if FILE_RE.match(p.name)),
                   key=lambda p: int(FILE_RE.match(p.name).group(1)))
    if files:
        worlds = {int(FILE_RE.match(p.name).group(2)) for p in files}
        if len(worlds) != 1 or len(files) != next(iter(worlds)):
            raise CheckpointError(f"{path}: amax_dict files of {sorted(worlds)} ranks, {len(files)} present",
                                  at=str(path), hint="copy every rank's amax_dict_rank*-mp*.pt of one calibration")
    return files


def native_to_hf(name: str) -> str:
    for pat, rep in _RENAMES:
        name = re.sub(pat, rep, name)
    return name


def load_amax_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Merge ranks by max; keep only amax entries, under transformers names."""
    import torch

    merged: dict[str, torch.Tensor] = {}
    for f in files:
        sd = torch.load(f, map_location="cpu", weights_only=True)
        for k, v in sd.items():
            if not k.endswith("amax") or not isinstance(v, torch.Tensor):
                continue
            hf = native_to_hf(k)
            v = v.detach().float()
            merged[hf] = torch.maximum(merged[hf], v) if hf in merged and merged[hf].shape == v.shape else v
    if not merged:
        raise CheckpointError(f"no amax entries in {files[0].parent}", at=str(files[0]))
    return merged
