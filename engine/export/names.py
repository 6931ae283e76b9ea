"""Snapshot module names (the transformers model's) → checkpoint module names (the files' own).

V3 checkpoints use transformers' names already; V4 checkpoints keep DeepSeek's native names
(`layers.0.attn.wq_a`, `layers.1.ffn.experts.3.w1`), which transformers renames when it loads. The
calibration family's `source_map` (transformers' own renamings; engine.calibrate.names_memo, from the snapshot
where the calibration kept it) gives the mapping per layer; the shared fused-experts input amax is spread over
every expert of its container.
"""

from __future__ import annotations

import re

from engine.calibrate.names_memo import ModelNames
from engine.export.scales import ModuleAmax

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def snapshot_layers(ma: ModuleAmax) -> list[int]:
    """The decoder layers the snapshot's modules belong to."""
    keys = list(ma.weight) + list(ma.input) + [s.split("|")[0] for s in ma.shared_input]
    return sorted({int(m.group(1)) for k in keys if (m := _LAYER.match(k))})


def to_checkpoint_names(ma: ModuleAmax, known: ModelNames | None) -> ModuleAmax:
    """`ma` under the checkpoint's module names, from `known` (engine.calibrate.names_memo: the source map of each
    of the snapshot's layers); unchanged where the family is unknown (None)."""
    if known is None:
        return ma
    table: dict[str, str] = {}
    experts: dict[str, list[str]] = {}  # "model.layers.i.mlp.experts|gate_proj" -> checkpoint modules
    for i in snapshot_layers(ma):
        plain, ex = known.source_map(i)
        for rel, src in plain.items():
            if rel.endswith(".weight") and src.endswith(".weight"):
                table[f"model.layers.{i}.{rel[:-7]}"] = src[:-7]
        for (e, proj), src in ex.items():
            hf = f"model.layers.{i}.mlp.experts.{e}.{_PROJ[proj]}"
            table[hf] = src[:-7]
            experts.setdefault(f"model.layers.{i}.mlp.experts|{_PROJ[proj]}", []).append(src[:-7])
    out = ModuleAmax()
    for k, v in ma.weight.items():
        out.weight[table.get(k, k)] = v
    for k, v in ma.input.items():
        out.input[table.get(k, k)] = v
    for k, v in ma.shared_input.items():
        for mod in experts.get(k, []):
            out.input.setdefault(mod, v)
        if k not in experts:
            out.shared_input[k] = v
    return out
