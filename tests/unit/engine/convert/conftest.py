"""Fixtures of the conversion's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from engine.convert import convert_checkpoint


@pytest.fixture(scope="module")
def tiny_nvfp4(tiny_ckpt, tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """(source, its weight-only NVFP4 conversion) of the tiny DeepSeek-V3 checkpoint stored as `dtype`, converted
    once per test module and options (`convert_checkpoint`'s keywords)."""
    made: dict[tuple, tuple[Path, Path]] = {}

    def make(dtype: str, **kw) -> tuple[Path, Path]:
        key = (dtype, *sorted(kw.items()))
        if key not in made:
            src = tiny_ckpt("deepseek-v3", dtype)
            out = tmp_path_factory.mktemp("nvfp4") / "out"
            convert_checkpoint(src, out, to="nvfp4", **kw)
            made[key] = src, out
        return made[key]

    return make
