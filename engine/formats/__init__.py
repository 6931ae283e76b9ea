"""Numerics (FP8 block-128, UE8M0, MXFP4, NVFP4) and the registered output layouts.

Importing this package registers every layout by name (`Layout.get("modelopt")`, `"compressed-tensors"`,
`"fp8-block"`, `"fp8-block-ue8m0"`, `"bf16"`); see engine/formats/layout.py.
"""

from engine.formats.layout import ConfigPieces, Layout, TensorSpec, layout_for

from engine.formats.bf16 import layout as _bf16  # noqa: F401,E402  (registers "bf16")
from engine.formats.compressed_tensors import layout as _ct  # noqa: F401,E402  (registers "compressed-tensors")
from engine.formats.fp8_block import layout as _fp8  # noqa: F401,E402  (registers "fp8-block", "fp8-block-ue8m0")
from engine.formats.modelopt import layout as _mo  # noqa: F401,E402  (registers "modelopt")

__all__ = ["ConfigPieces", "Layout", "TensorSpec", "layout_for"]
