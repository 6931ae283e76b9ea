"""Export runs on the convert pipeline (engine.convert.pipeline: host arrays and the CPU kernels on CPU); its
output is byte for byte what the per-item torch math (engine.convert.compute) writes, in both layouts, with the
router kept in F32 and every quantized module's activation scale added."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from engine.calibrate.streaming import calibrate
from engine.convert import compute_host
from engine.export.api import export_checkpoint

pytestmark = pytest.mark.slow

LAYOUTS = ("modelopt", "compressed-tensors")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _torch_math(item, src, v4_fp8=False, item_parallel=False):
    """The torch path for every item, on the same bytes (what export computed before it used the pipeline)."""
    from engine.convert.compute import compute_item

    return compute_item(item, {k: v.torch() for k, v in src.items()}, "cpu", v4_fp8=v4_fp8)


def test_fp8_source_export_equals_the_torch_math(tiny_ckpt, tmp_path, monkeypatch):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=False)
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([f"sample {i}: the quick brown fox {'jumps ' * i}over the lazy dog"
                                   for i in range(4)]))
    calibrate(src, samples, tmp_path / "amax", num_samples=4, seq_len=16, device="cpu")
    calls = []
    real = compute_host.compute_item

    def counted(*a, **k):
        calls.append(a[0].key)
        return real(*a, **k)

    monkeypatch.setattr(compute_host, "compute_item", counted)
    rep = export_checkpoint(src, tmp_path / "amax", tmp_path / "host", layouts=LAYOUTS, device="cpu",
                            shard_size="200KB")
    assert calls, "the CPU export did not run on the host pipeline"
    monkeypatch.setattr(compute_host, "compute_item", _torch_math)
    export_checkpoint(src, tmp_path / "amax", tmp_path / "torch", layouts=LAYOUTS, device="cpu", shard_size="200KB")
    host, ref = _tree(tmp_path / "host"), _tree(tmp_path / "torch")
    assert len([n for n in host if n.endswith(".safetensors")]) > 2
    assert host.keys() == ref.keys()
    assert [n for n in host if host[n] != ref[n]] == []
    mods = rep["quantized_modules"]
    for lay, scale in (("modelopt", "input_scale"), ("compressed-tensors", "input_global_scale")):
        d = tmp_path / "host" / lay
        wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        assert len([n for n in wm if n.endswith("." + scale)]) == mods
        router = next(n for n in wm if n.endswith("mlp.gate.weight"))
        with safe_open(str(d / wm[router]), "pt") as f:
            assert str(f.get_slice(router).get_dtype()) == "F32"
