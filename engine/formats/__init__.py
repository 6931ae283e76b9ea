"""Numerics (FP8 block-128, UE8M0, MXFP4, NVFP4) and the registered output layouts.

`from engine.formats import Layout` (or ConfigPieces, Modules, TensorSpec, layout_for) registers every layout by
name (`Layout.get("modelopt")`, `"compressed-tensors"`, `"fp8-block"`, `"fp8-block-ue8m0"`, `"bf16"`); see
engine/formats/layout.py. Importing the package alone loads nothing (no torch), and neither do the layouts: the
CPU converter imports its torch-free submodules (engine.formats.grid, engine.formats.nvfp4.host, the layouts)
through it.
"""

from __future__ import annotations

import importlib

__all__ = ["ConfigPieces", "Layout", "Modules", "TensorSpec", "layout_for"]


def __getattr__(name: str):
    if name in __all__:
        layout = importlib.import_module("engine.formats.layout")
        layout.load_layouts()
        return getattr(layout, name)
    raise AttributeError(name)
