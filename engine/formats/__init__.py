"""Numerics and output layouts: FP8 block-128, MXFP4, NVFP4."""
