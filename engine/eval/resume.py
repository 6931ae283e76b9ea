"""eval's per-layer resume state: after each decoder layer, both models' hidden states and the figures so far.

A run killed at layer i starts again at layer i: the state directory holds `acts-src-<i>.safetensors` and
`acts-out-<i>.safetensors` (layer i's inputs, one tensor per batch, on the host as between layers) and
`progress.json` (the next layer i, the per-layer errors and what the decoded layers reported). The activations are
written first, each atomically, then `progress.json`, then the previous layer's files go: `progress.json` always
names activations that are on disk. A state written for other inputs (another output, source, samples
file, sample count, sequence length, batch size, dtype, or either checkpoint's files rewritten since: names, sizes,
modification times) is not resumed from: it is set aside and the run starts at layer 0. So is a state that cannot
be read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.core.fsutil import atomic_replace, atomic_write_json

PROGRESS = "progress.json"
STATE_FORMAT = 1


@dataclass
class EvalState:
    """What `evaluate` carries from one layer to the next."""

    next_layer: int = 0
    h_src: list[torch.Tensor] = field(default_factory=list)
    h_out: list[torch.Tensor] = field(default_factory=list)
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    encodings: dict[str, int] = field(default_factory=dict)
    act: set[str] = field(default_factory=set)


def state_key(**inputs: Any) -> str:
    """A digest of everything that decides the hidden states (paths, files, samples digest, shapes, dtype)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def files_stamp(directory: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of every file at the top of a checkpoint directory: changes when it is rewritten."""
    return [(f.name, st.st_size, st.st_mtime_ns) for f in sorted(Path(directory).iterdir())
            if f.is_file() and (st := f.stat())]


def load(state_dir: str | os.PathLike | None, key: str) -> EvalState | None:
    """The saved state for `key`, or None (no state, or one written for other inputs: renamed aside)."""
    if state_dir is None:
        return None
    d = Path(state_dir)
    try:
        prog = json.loads((d / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if prog.get("format") != STATE_FORMAT or prog.get("key") != key:
        (d / PROGRESS).replace(d / f"{PROGRESS}.stale")
        return None
    try:
        n, nxt = int(prog["batches"]), int(prog["next_layer"])
        acts = [load_file(str(d / f"acts-{which}-{nxt}.safetensors")) for which in ("src", "out")]
        return EvalState(next_layer=nxt,
                         h_src=[acts[0][f"b{j}"] for j in range(n)], h_out=[acts[1][f"b{j}"] for j in range(n)],
                         per_layer=list(prog["per_layer"]), notes=list(prog["notes"]),
                         encodings=dict(prog["encodings"]), act=set(prog["activations"]))
    except Exception:  # noqa: BLE001  (a missing or torn file: start again rather than fail on every retry)
        (d / PROGRESS).replace(d / f"{PROGRESS}.stale")
        return None


def save(state_dir: str | os.PathLike | None, key: str, st: EvalState) -> None:
    """Record `st` after a finished layer (no-op without a state directory)."""
    if state_dir is None:
        return
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    for which, hs in (("src", st.h_src), ("out", st.h_out)):
        with atomic_replace(d / f"acts-{which}-{st.next_layer}.safetensors") as tmp:
            save_file({f"b{j}": h.contiguous() for j, h in enumerate(hs)}, str(tmp))
            fd = os.open(tmp, os.O_RDONLY)  # on disk before progress.json names it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    atomic_write_json(d / PROGRESS, {"format": STATE_FORMAT, "key": key, "next_layer": st.next_layer,
                                     "batches": len(st.h_src), "per_layer": st.per_layer, "notes": st.notes,
                                     "encodings": st.encodings, "activations": sorted(st.act)})
    keep = {f"acts-{which}-{st.next_layer}.safetensors" for which in ("src", "out")}
    for old in d.glob("acts-*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
