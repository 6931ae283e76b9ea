"""What export asks transformers about a model, kept with the calibration's snapshot.

Export maps the snapshot's module names (transformers' model's) to the checkpoint's (`LayerFamily.source_map`:
transformers' renamings), and writes the tensors transformers keeps in float32 as F32 (the model class's
`_keep_in_fp32_modules_strict`). Both take importing transformers' loading code and the family's modeling: 2.1 s
of a 5.8 s export of a 1.27 GB checkpoint on 2 cores, time the calibration has already spent. The calibration
writes the answers into the snapshot (`export_names.json`, `write_names_memo`) with the key of what they depend on
(the checkpoint's config.json and tensor names, the family and quantdeck's family code, transformers' version);
export reads them from there when its own key equals it (`read_names_memo`), else asks transformers (a modelopt
amax dict, a snapshot made elsewhere or with another transformers). The answers are the same either way.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.fsutil import atomic_write_json, read_json
from engine.core.packages import installed_version

NAMES_MEMO = "export_names.json"
NAMES_MEMO_FORMAT = 1

LayerMap = tuple[dict[str, str], dict[tuple[int, str], str]]  # LayerFamily.source_map's (plain, experts)


@dataclass(frozen=True)
class ModelNames:
    """transformers' answers for one checkpoint: the float32-kept patterns and the source map of some layers."""

    keep_fp32: tuple[str, ...]
    layers: dict[int, LayerMap]

    def source_map(self, i: int) -> LayerMap:
        return self.layers[i]


def model_names(config: dict, names: set[str], layers: list[int]) -> ModelNames:
    """Asked of transformers (imports the family's modeling and transformers' loading code)."""
    from engine.calibrate.family import LayerFamily

    family = LayerFamily.for_config(config)
    keep = tuple(getattr(family.model_class(), "_keep_in_fp32_modules_strict", None) or ())
    return ModelNames(keep, {i: family.source_map(i, names) for i in layers})


def names_key(model_dir: str | os.PathLike, config: dict, names: set[str]) -> dict[str, Any]:
    """What `model_names` depends on, found without importing transformers."""
    from engine.calibrate import family

    return {"config_sha256": hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest(),
            "names_sha256": hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest(),
            "family": family.LayerFamily.for_config(config).registered_name,
            "family_sha256": hashlib.sha256(Path(family.__file__).read_bytes()).hexdigest(),
            "transformers": installed_version("transformers")}


def write_names_memo(amax_dir: str | os.PathLike, model_dir: str | os.PathLike, config: dict, names: set[str],
                     layers: list[int]) -> None:
    """`model_names` of `layers` into the snapshot with its key (the calibration, transformers imported)."""
    got = model_names(config, names, layers)
    atomic_write_json(Path(amax_dir) / NAMES_MEMO, {
        "format": NAMES_MEMO_FORMAT, "key": names_key(model_dir, config, names), "keep_fp32": list(got.keep_fp32),
        "layers": {str(i): {"plain": plain, "experts": [[e, proj, n] for (e, proj), n in sorted(ex.items())]}
                   for i, (plain, ex) in got.layers.items()}})


def read_names_memo(amax_dir: str | os.PathLike, key: dict[str, Any], layers: list[int]) -> ModelNames | None:
    """The snapshot's memo when it was written for `key` and holds `layers`; None when it is missing, unreadable,
    of another format, written for other inputs or without one of the layers (then transformers is asked)."""
    try:
        memo = read_json(Path(amax_dir) / NAMES_MEMO)
    except (OSError, ValueError):
        return None
    if not isinstance(memo, dict) or memo.get("format") != NAMES_MEMO_FORMAT or memo.get("key") != key:
        return None
    try:
        keep = tuple(str(p) for p in memo["keep_fp32"])
        stored = memo["layers"]
        maps: dict[int, LayerMap] = {}
        for i in layers:
            layer = stored[str(i)]
            plain = {str(k): str(v) for k, v in layer["plain"].items()}
            maps[i] = (plain, {(int(e), str(proj)): str(n) for e, proj, n in layer["experts"]})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return ModelNames(keep, maps)
