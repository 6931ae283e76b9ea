"""Shapes of the block formats, without torch: the FP8 scale grid, its tile size, NVFP4's packed columns.

Planning a conversion needs every output shape before any data is read; these are all it takes, so the
planner (and the torch-free CPU converter) import them from here. engine.formats.fp8_block.helpers and
engine.formats.nvfp4.helpers re-export them.
"""

from __future__ import annotations

from engine.core.errors import FormatError

NVFP4_BLOCK = 16  # elements per NVFP4 block scale
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def scale_grid(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of the block-scale tensor for a weight of `shape`."""
    o, i = shape
    bo, bi = block
    return (-(-o // bo), -(-i // bi))


def infer_block(weight_shape: tuple[int, int], scale_shape: tuple[int, ...]) -> tuple[int, int]:
    """The tile size that maps `weight_shape` onto `scale_shape` (128×128 when that fits, as DeepSeek ships)."""
    o, i = weight_shape
    if len(scale_shape) != 2 or scale_shape[0] <= 0 or scale_shape[1] <= 0:
        raise FormatError(
            f"block scale must be 2-D, got shape {tuple(scale_shape)} for weight {tuple(weight_shape)}",
            at="scale",
            hint="per-tensor or per-channel FP8 scales are not DeepSeek block format",
        )
    so, si = scale_shape
    if scale_grid((o, i), (128, 128)) == (so, si):
        return (128, 128)
    block = (-(-o // so), -(-i // si))
    if scale_grid((o, i), block) != (so, si):
        raise FormatError(
            f"no block size maps weight {tuple(weight_shape)} onto scale {tuple(scale_shape)}",
            at="scale",
            hint="the scale companion does not belong to this weight",
        )
    return block


def packed_cols(i: int) -> int:
    """Columns of the packed uint8 tensor for `i` inputs (modelopt pads the last 16-block)."""
    return -(-i // NVFP4_BLOCK) * (NVFP4_BLOCK // 2)


def check_scale_grid(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]) -> None:
    """FormatError unless `scale_shape` is the grid of `weight_shape` with tiles of `block`."""
    want = scale_grid(tuple(weight_shape), tuple(block))
    if tuple(scale_shape) != want:
        raise FormatError(f"scale shape {tuple(scale_shape)} does not match weight {tuple(weight_shape)} with block "
                          f"{tuple(block)}: expected {want}", at="scale", hint="check the weight's scale companion")


def check_scale_values(scale) -> None:
    """FormatError unless every block scale (a float32 numpy array) is finite and >= 0."""
    import numpy as np

    if not np.isfinite(scale).all() or (scale < 0).any():
        raise FormatError("FP8 block scale holds inf, NaN or a negative value", at="scale",
                          hint="the source is corrupt")
