"""Streaming checkpoint conversion (NVFP4 weight-only, FP8-block, BF16), MTP injection, extras, validation.

    from engine.convert import convert_checkpoint, validate_checkpoint, inject_mtp, copy_extras

Everything is imported on first use: importing the package (as `python -m engine.convert` does before its
__main__ runs) loads no torch, so the entry point can start reading the source first.
"""

from __future__ import annotations

import importlib

__all__ = ["convert_checkpoint", "copy_extras", "parse_size", "inject_mtp", "validate_checkpoint"]

_WHERE = {"convert_checkpoint": "engine.convert.streaming", "parse_size": "engine.convert.streaming",
          "copy_extras": "engine.convert.extras", "validate_checkpoint": "engine.convert.validate",
          "inject_mtp": "engine.convert.mtp"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
