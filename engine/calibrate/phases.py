"""Where a calibration's wall time goes: seconds per named phase, summed over layers.

`calibrate()` returns them as summary["phases"] (rank 0's view when under torchrun) and puts each layer's
share in its `calibrate.layer` metric, so a benchmark or an operator can account for every second.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class Phases:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.monotonic()

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - t)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def merge(self, other: dict[str, float]) -> None:
        for k, v in other.items():
            self.add(k, v)

    @contextlib.contextmanager
    def gc_watch(self, name: str = "gc_s") -> Iterator[None]:
        """Count the time the garbage collector runs (any thread) under `name`; with objects that exist now
        (imported modules, the config) frozen, so full collections do not walk them again and again."""
        import gc

        start: list[float] = []

        def cb(phase, info):
            if phase == "start":
                start.append(time.monotonic())
            elif start:
                self.gc_seconds += time.monotonic() - start.pop()

        self.gc_seconds = 0.0
        gc.freeze()
        gc.callbacks.append(cb)
        try:
            yield
        finally:
            gc.callbacks.remove(cb)
            gc.unfreeze()
            self.seconds[name] = self.gc_seconds

    def report(self) -> dict[str, float]:
        """Phases rounded to ms, plus `total_s` (since construction) and `other_s` (not in any phase)."""
        total = time.monotonic() - self._t0
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        # gc_s and *_bg_s (background threads) overlap other phases: not subtracted again
        out["other_s"] = round(total - sum(v for k, v in self.seconds.items()
                                           if k != "gc_s" and not k.endswith("_bg_s")), 3)
        out["total_s"] = round(total, 3)
        return out
