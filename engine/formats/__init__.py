"""Numerics (FP8 block-128, UE8M0, MXFP4, NVFP4) and the registered output layouts.

`from engine.formats import Layout` (or ConfigPieces, TensorSpec, layout_for) registers every layout by name
(`Layout.get("modelopt")`, `"compressed-tensors"`, `"fp8-block"`, `"fp8-block-ue8m0"`, `"bf16"`); see
engine/formats/layout.py. Importing the package alone loads nothing (no torch): the CPU converter imports
its torch-free submodules (engine.formats.grid, engine.formats.nvfp4.host) through it.
"""

from __future__ import annotations

import importlib

__all__ = ["ConfigPieces", "Layout", "TensorSpec", "layout_for"]


def __getattr__(name: str):
    if name in __all__:
        layout = importlib.import_module("engine.formats.layout")
        for sub in ("bf16", "compressed_tensors", "fp8_block", "modelopt"):  # register the layouts
            importlib.import_module(f"engine.formats.{sub}.layout")
        return getattr(layout, name)
    raise AttributeError(name)
