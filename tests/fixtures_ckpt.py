"""Tiny real DeepSeek checkpoints for everyone's tests, built once per session and shared read-only.

tests/conftest.py imports the session-scoped `tiny_ckpt` fixture, so every test can simply ask for it:

    def test_something(tiny_ckpt):
        src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)        # Path, built on first use, cached
        v4 = tiny_ckpt("deepseek-v4", "bf16", hidden=320)     # any build_fixture keyword

Each distinct (family, dtype, options) is built once per session under one tmp dir; the files are made
read-only, so a test that must change a checkpoint copies it first (`copy_ckpt(src, tmp_path)`).
`dequantized_copy(src, dst)` writes the BF16 view of an FP8 fixture (FP8 block and MXFP4 weights decoded,
scales dropped, quantization_config removed) that transformers loads directly.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest


class _Cache:
    def __init__(self, root: Path):
        self.root = root
        self.built: dict[tuple, Path] = {}
        self.lock = threading.Lock()

    def get(self, family: str = "deepseek-v3", dtype: str = "bf16", **kw) -> Path:
        from engine.fixtures import build_fixture

        key = (family, dtype, tuple(sorted(kw.items())))
        with self.lock:
            if key not in self.built:
                tag = "_".join([family, dtype] + [f"{k}-{v}" for k, v in sorted(kw.items())])
                path = build_fixture(self.root / tag, family=family, dtype=dtype, **kw)
                _make_read_only(path)
                self.built[key] = path
            return self.built[key]


def _make_read_only(path: Path) -> None:
    for p in path.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Callable[..., Path]:
    """Factory: tiny_ckpt(family="deepseek-v3", dtype="bf16", **build_fixture_kwargs) -> read-only Path."""
    return _Cache(tmp_path_factory.mktemp("tiny_ckpts")).get


def copy_ckpt(src: Path, dst_parent: Path, name: str | None = None) -> Path:
    """A writable copy of a cached fixture (for tests that corrupt or edit one)."""
    dst = Path(dst_parent) / (name or Path(src).name)
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return dst


def dequantized_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """The BF16 view of a checkpoint: FP8-block (weight_scale_inv / .scale) and MXFP4 weights decoded to BF16,
    scale companions dropped, quantization_config removed; other files copied. One shard."""
    import torch
    from safetensors.torch import save_file

    from engine.checkpoint import CheckpointReader
    from engine.formats.fp8_block.helpers import dequant_fp8_block
    from engine.formats.mxfp4.helpers import dequant_mxfp4

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    r = CheckpointReader(src)
    names = set(r.names())
    out = {}
    for n in sorted(names):
        if n.endswith((".weight_scale_inv", ".scale")) and n.rsplit(".", 1)[0] + ".weight" in names:
            continue
        t = r.get(n)
        stem = n[: -len(".weight")] if n.endswith(".weight") else None
        scale = next((s for s in (f"{stem}.weight_scale_inv", f"{stem}.scale") if stem and s in names), None)
        if scale is not None and t.dtype == torch.float8_e4m3fn:
            t = dequant_fp8_block(t, r.get(scale)).to(torch.bfloat16)
        elif scale is not None and t.dtype in (torch.int8, torch.uint8):
            t = dequant_mxfp4(t, r.get(scale)).to(torch.bfloat16)
        out[n] = t.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in dst.iterdir():
        f.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return dst
