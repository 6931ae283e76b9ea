"""Where export's amax comes from: a quantdeck snapshot dir, or modelopt DeepSeek example's amax_dict files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from engine.calibrate import snapshot as snap
from engine.calibrate.amax_dict import amax_dict_files, load_amax_dict
from engine.core.errors import CheckpointError


def load_any_amax(path: str | os.PathLike, model_dir: str | os.PathLike | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(amax by modelopt-on-transformers quantizer name, origin info)."""
    p = Path(path)
    if p.is_dir() and snap.done_layers(p):
        man = snap.read_manifest(p) or {}
        if man.get("num_layers") and snap.resume_point(p) < man["num_layers"]:
            raise CheckpointError(f"{p} is an unfinished calibration ({snap.resume_point(p)}/{man['num_layers']} "
                                  "layers)", at=str(p), hint="resume `quantdeck calibrate` with the same --out first")
        amax = snap.load_amax(p)
        h = hashlib.sha256()
        for i in snap.done_layers(p):
            h.update(snap.layer_path(p, i).read_bytes())
        return amax, {"kind": "quantdeck-snapshot", "path": str(p), "sha256": h.hexdigest(),
                      "quant_cfg": man.get("quant_cfg"), "layers": len(snap.done_layers(p))}
    files = amax_dict_files(p)
    if files:
        amax = load_amax_dict(files)
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes())
        return amax, {"kind": "modelopt-amax-dict", "path": str(p), "sha256": h.hexdigest(), "files": len(files)}
    raise CheckpointError(f"{p} holds neither layer_NNN.safetensors nor amax_dict_rank*-mp*.pt files", at=str(p),
                          hint="give the --out of `quantdeck calibrate`, or modelopt's DeepSeek --output_path")
