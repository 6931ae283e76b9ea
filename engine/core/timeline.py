"""Moments of a run, in seconds since the process started (convert's summary key `timeline_s`).

`mark(name)` records the first time `name` happens in this process; `since_start()` returns them. The
process start comes from /proc (Linux), so the interpreter's own start-up and imports are counted too;
elsewhere it is the moment this module was imported.
"""

from __future__ import annotations

import os
import time

_marks: dict[str, float] = {}


def _process_start() -> float:
    """time.monotonic() of the process start (CLOCK_MONOTONIC and /proc's boot-relative times agree on Linux)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic()


_START = _process_start()


def mark(name: str) -> None:
    _marks.setdefault(name, time.monotonic())


def begin(name: str, keep: tuple[str, ...] = ("main", "imported")) -> None:
    """A new run in this process: forget the marks of an earlier one (but the process's own `keep`)."""
    for k in [k for k in _marks if k not in keep]:
        del _marks[k]
    mark(name)


def since_start() -> dict[str, float]:
    return {k: round(v - _START, 3) for k, v in sorted(_marks.items(), key=lambda kv: kv[1])}
