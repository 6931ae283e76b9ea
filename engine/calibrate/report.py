"""Coverage and snapshot reports: tokens per expert per layer, experts that saw no token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.calibrate import snapshot as snap


def build_coverage(out: Path, n_layers: int) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    empty: list[str] = []
    for i in snap.done_layers(out):
        _, cov = snap.read_layer(out, i)
        for module, counts in cov.items():
            layers[module] = {"tokens_per_expert": counts, "tokens": int(sum(counts)),
                              "experts_without_tokens": [e for e, c in enumerate(counts) if c == 0]}
            empty += [f"{module}.{e}" for e, c in enumerate(counts) if c == 0]
    return {"layers": layers, "experts_without_tokens": empty, "num_layers": n_layers}
