"""The amax snapshot on disk: one safetensors file per finished decoder layer, plus manifest and coverage.

    AMAX_DIR/
      manifest.json              samples hash, token count, model fingerprint, config, versions, world size
      layer_000.safetensors      {"<quantizer module name>.amax": fp32 tensor, ...}; metadata "coverage" (JSON)
      layer_001.safetensors      ...   (written atomically by rank 0 once every rank has saved its activations)
      acts/rank000/layer_001.safetensors   activations leaving layer 1 (= entering layer 2) for rank 0's batches
      coverage.json              tokens routed per expert per layer (summed over ranks), when finished
      expected_quantizers.json   the quantizer names modelopt inserts for the config, with what they depend on
                                 (engine.calibrate.validate: `validate --amax` then needs neither modelopt nor
                                 transformers), when finished

A layer file is the commit mark of its layer: a rerun starts after the last contiguous one. Activation files
of older layers are deleted once the next layer commits, so disk holds one layer's activations per rank.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.checkpoint.safetensors_format import TensorSpec, build_shard_map
from engine.core.errors import CheckpointError
from engine.core.fsutil import atomic_replace, read_json
from engine.core.names import SNAPSHOT_FORMAT

if TYPE_CHECKING:
    import numpy as np
    import torch

LAYER_RE = re.compile(r"^layer_(\d{3,})\.safetensors$")
MANIFEST = "manifest.json"
COVERAGE = "coverage.json"
EXPECTED = "expected_quantizers.json"


def layer_path(out: Path, i: int) -> Path:
    return Path(out) / f"layer_{i:03d}.safetensors"


def acts_path(out: Path, rank: int, i: int) -> Path:
    return Path(out) / "acts" / f"rank{rank:03d}" / f"layer_{i:03d}.safetensors"


def save_safetensors_atomic(path: Path, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> None:
    """safetensors.save_file into a sibling temp file, fsync, rename."""
    from safetensors.torch import save_file

    with atomic_replace(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


def save_safetensors_streamed(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                              ) -> None:
    """Like save_safetensors_atomic (same bytes), for large CPU tensors: the header is built here and each
    tensor's memory goes to the file as it is, with no serialized copy; the GIL is released during each write,
    so a writer thread does not stall the calibrating thread."""
    import torch

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    lay = build_shard_map([TensorSpec.of(k, v.dtype, v.shape) for k, v in flat.items()], metadata)
    with atomic_replace(path) as tmp, open(tmp, "wb", buffering=0) as fh:
        fh.write(lay.header)
        for k in sorted(flat, key=lambda n: lay.offsets[n][0]):
            if flat[k].numel():
                fh.write(memoryview(flat[k].reshape(-1).view(torch.uint8).numpy()))
        os.fsync(fh.fileno())


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        return {k: fh.get_tensor(k) for k in fh.keys()}, meta


def done_layers(out: Path) -> list[int]:
    """Indices of committed layer files, sorted."""
    out = Path(out)
    if not out.is_dir():
        return []
    return sorted(int(m.group(1)) for p in out.iterdir() if (m := LAYER_RE.match(p.name)))


def resume_point(out: Path) -> int:
    """The first layer to calibrate: one past the last contiguous committed layer."""
    k = 0
    done = set(done_layers(out))
    while k in done:
        k += 1
    return k


def write_layer(out: Path, i: int, amax: dict[str, torch.Tensor], coverage: dict[str, Any] | None) -> None:
    meta = {"format": SNAPSHOT_FORMAT, "layer": str(i), "coverage": json.dumps(coverage or {})}
    save_safetensors_atomic(layer_path(out, i), {k: v.float().reshape(v.shape) for k, v in amax.items()}, meta)


def read_layer(out: Path, i: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = load_safetensors(layer_path(out, i))
    return tensors, json.loads(meta.get("coverage") or "{}")


def read_layer_arrays(out: Path, i: int) -> dict[str, np.ndarray]:
    """A layer file's amax as numpy arrays: no torch import (a second or more), for checks that only read them."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(layer_path(out, i)))
    except TypeError:  # a dtype numpy lacks (bfloat16): read with torch, as float32
        return {k: v.float().numpy() for k, v in read_layer(out, i)[0].items()}


def write_acts(out: Path, rank: int, i: int, batches: list[torch.Tensor]) -> None:
    save_safetensors_streamed(acts_path(out, rank, i), {f"b{j:05d}": b for j, b in enumerate(batches)},
                            {"format": SNAPSHOT_FORMAT, "layer": str(i), "rank": str(rank)})


def read_acts(out: Path, rank: int, i: int, n_batches: int) -> list[torch.Tensor]:
    p = acts_path(out, rank, i)
    if not p.exists():
        raise CheckpointError(f"activations after layer {i} for rank {rank} are missing ({p})", at=str(p),
                              hint="the snapshot is incomplete; calibrate into a fresh --out directory")
    tensors, _ = load_safetensors(p)
    if len(tensors) != n_batches:
        raise CheckpointError(f"{p} holds {len(tensors)} batches, expected {n_batches}", at=str(p),
                              hint="resume with the same samples, batch size and number of ranks")
    return [tensors[f"b{j:05d}"] for j in range(n_batches)]


def prune_acts(out: Path, rank: int, keep: int) -> None:
    d = Path(out) / "acts" / f"rank{rank:03d}"
    if not d.is_dir():
        return
    for p in d.iterdir():
        m = LAYER_RE.match(p.name)
        if m and int(m.group(1)) < keep:
            p.unlink(missing_ok=True)


def load_amax(out: Path) -> dict[str, torch.Tensor]:
    """Every amax of a snapshot directory, merged over its layer files."""
    merged: dict[str, torch.Tensor] = {}
    for i in done_layers(out):
        tensors, _ = read_layer(out, i)
        merged.update(tensors)
    return merged


def read_manifest(out: Path) -> dict[str, Any] | None:
    return read_json(Path(out) / MANIFEST)
