"""Does a checkpoint's config.json describe the tensors it sits beside, and are two checkpoints the same model?

Cheap checks on names and header shapes only (one pass over the names, no layout detection):

* `layer_disagreements`: the decoder layers present (`layers.N.` / `model.layers.N.`) are exactly
  0 … num_hidden_layers-1, plus the MTP layers that `num_nextn_predict_layers` places after them;
* `hidden_size_disagreements`: the token embedding's width is the config's hidden_size;
* `refuse_other_model`: `quantdeck validate --against` compares a checkpoint with a source of the same family
  and shape (model_type, num_hidden_layers, hidden_size).

Each returns or raises CheckpointError naming config.json and the key, with both values.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Protocol

from engine.core.errors import CheckpointError

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")
_EMBED = ("model.embed_tokens.weight", "embed_tokens.weight", "embed.weight", "model.embed.weight",
          "tok_embeddings.weight")
_PACKED = ("U8", "I8")  # a packed FP4 embedding is half as wide as the model: not comparable
HINT = "config.json belongs to another model, or shards are missing: copy the source's own config.json and shards"


class _Meta(Protocol):
    dtype_name: str
    shape: tuple[int, ...]


def _first_int(config: Mapping, *keys: str) -> tuple[str, int] | None:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return k, v
    return None


def _span(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    for x in xs:
        if parts and int(parts[-1].split("-")[-1]) == x - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{x}"
        else:
            parts.append(str(x))
    return ",".join(parts) or "none"


def layer_disagreements(config: Mapping, names, config_path: str = "config.json") -> list[CheckpointError]:
    """num_hidden_layers against the decoder layers the tensor names hold (MTP layers after them allowed)."""
    key_n = _first_int(config, "num_hidden_layers", "n_layers", "num_layers")
    present = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    if key_n is None or not present:
        return []
    key, n = key_n
    mtp = (_first_int(config, "num_nextn_predict_layers", "n_mtp_layers") or ("", 0))[1]
    missing = sorted(set(range(n)) - present)
    extra = sorted(x for x in present if x >= n + max(mtp, 0))
    if not missing and not extra:
        return []
    bits = ([f"missing layers {_span(missing)}"] if missing else []) + \
        ([f"unexpected layers {_span(extra)}"] if extra else [])
    return [CheckpointError(f"config.json has {key}={n} but the tensors hold layers {_span(sorted(present))} "
                            f"({'; '.join(bits)})", at=f"{config_path}:{key}", hint=HINT,
                            title="config and tensors disagree")]


def hidden_size_disagreements(config: Mapping, metas: Mapping[str, _Meta],
                              config_path: str = "config.json") -> list[CheckpointError]:
    """hidden_size against the width of the token embedding."""
    key_h = _first_int(config, "hidden_size", "dim")
    if key_h is None:
        return []
    key, h = key_h
    for name in _EMBED:
        m = metas.get(name)
        if m is None or m.dtype_name in _PACKED or len(m.shape) != 2:
            continue
        if m.shape[1] != h:
            return [CheckpointError(f"config.json has {key}={h} but {name} is {list(m.shape)} (width {m.shape[1]})",
                                    at=f"{config_path}:{key}", hint=HINT, title="config and tensors disagree")]
        return []
    return []


def config_disagreements(config: Mapping, metas: Mapping[str, _Meta],
                         config_path: str = "config.json") -> list[CheckpointError]:
    """Both checks: layers, then hidden size."""
    return layer_disagreements(config, metas, config_path) + hidden_size_disagreements(config, metas, config_path)


SAME_MODEL_KEYS = ("model_type", "num_hidden_layers", "hidden_size")


def refuse_other_model(checkpoint: str | Path, against: str | Path) -> None:
    """CheckpointError unless `against` has the checkpoint's model_type, num_hidden_layers and hidden_size
    (a missing config.json on either side is left to the readers, which say so)."""
    a, b = _config_of(Path(checkpoint)), _config_of(Path(against))
    if a is None or b is None:
        return
    for key in SAME_MODEL_KEYS:
        if key in a and key in b and a[key] != b[key]:
            raise CheckpointError(
                f"--against {against} is another model: its {key} is {b[key]!r}, the checkpoint's is {a[key]!r}",
                at=f"{Path(against) / 'config.json'}:{key}",
                hint="pass the source this checkpoint was converted from", title="not the same model")


def _config_of(d: Path) -> dict | None:
    try:
        obj = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
