"""What both item maths (engine.convert.compute on torch, engine.convert.compute_host on host arrays) check of
a member's amax: finite, and not vanishing beside its fused group's."""

from __future__ import annotations

import math

from engine.convert.plan import Item
from engine.core.errors import CORRUPT_SOURCE, FormatError


def check_finite(name: str, amax) -> None:
    """A member's amax must be finite: inf or NaN anywhere in the weight is a corrupt source."""
    if not math.isfinite(float(amax)):
        raise FormatError(f"{name} holds inf or NaN (amax {float(amax)})", at=name, hint=CORRUPT_SOURCE)


SPREAD_WARN = 1e-4  # a fused member whose max is below this share of the group's keeps little NVFP4 precision


def spread_notes(item: Item, amaxes: list[float]) -> list[str]:
    """Notes for fused members whose own max is tiny beside the group's: with the shared `weight_scale_2` their
    block scales fall to E4M3's smallest and most of their values to 0 (a huge value in a partner, say)."""
    top = max(amaxes, default=0.0)
    if len(amaxes) < 2 or not top:
        return []
    return [f"{m.name}: max {a:.3g} is {a / top:.1e} of its fused group's ({top:.3g}); with the shared "
            "weight_scale_2 most of its values round to 0 (check the group's weights)"
            for m, a in zip(item.members, amaxes, strict=True) if a / top < SPREAD_WARN]
