"""The device a format's fast path runs on: "auto" (CUDA when torch sees it, else the CPU), "cpu", "cuda" or
"cuda:N". Shared by the NVFP4 and FP8-block dispatchers, which both pick their kernels by it."""

from __future__ import annotations

import torch

from engine.core.errors import FormatError


def resolve_device(device: str = "auto") -> str:
    d = (device or "auto").lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FormatError(f"device {device!r} asked for but CUDA is not available", at="device",
                              hint="use cpu or auto")
        return d
    raise FormatError(f"unknown device {device!r}", at="device", hint="use auto, cpu or cuda[:N]")
