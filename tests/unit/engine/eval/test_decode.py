"""OutputModel: a layer read in a few large reads holds the bytes each tensor holds alone, and the routed experts
decoded all at once give the same bits, scales and warnings as the expert-by-expert path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.calibrate.family import LayerFamily
from engine.calibrate.layer import compute_dtype, keep_fp32
from engine.eval.decode import OutputModel
from tests.fixtures_ckpt import copy_ckpt


def _model(path) -> OutputModel:
    from engine.checkpoint.reader import CheckpointReader

    cfg = CheckpointReader(path).config
    family = LayerFamily.for_config(cfg)
    hf_config = family.hf_config(cfg)
    dtype = compute_dtype(cfg)
    return OutputModel(path, family, hf_config, dtype, torch.device("cpu"), keep_fp32(family, dtype))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _built(model: OutputModel, i: int):
    b = model.build(model.read(i))
    quant = {k: (q.kind, q.global_scale, q.input_scale) for k, q in b.linears.items()}
    for k, e in b.experts.items():
        for w, q in (("w13", e.w13), ("w2", e.w2)):
            quant[f"{k}.{w}"] = None if q is None else (q.kind, q.global_scale, q.input_scale)
    return b.params, quant, b.warnings, b.encodings


@pytest.mark.parametrize("layout", ["modelopt", "compressed-tensors"])
def test_experts_at_once_match_expert_by_expert(w4a4_out, tmp_path, monkeypatch, layout):
    out = copy_ckpt(w4a4_out / layout, tmp_path)
    shard = next(out.glob("*.safetensors"))
    d = load_file(shard)
    scale = "weight_scale_2" if layout == "modelopt" else "weight_global_scale"
    up = f"model.layers.1.mlp.experts.1.up_proj.{scale}"
    d[up] = d[up] * 2  # w3's own global scale: read with w1's, and warned about
    save_file(d, str(shard), metadata={"format": "pt"})
    m = _model(out)
    raw = m.read(1)
    stored = m._upload(raw)  # each stored tensor a view of the one buffer (or its own copy, where misaligned)
    assert set(stored) == set(raw.views) and stored
    for name, t in stored.items():
        alone = m.reader.get(name)
        assert t.dtype == alone.dtype and torch.equal(_bytes(t), _bytes(alone)), name
    ran = []
    real = OutputModel._experts_nvfp4
    monkeypatch.setattr(OutputModel, "_experts_nvfp4", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    fast = _built(m, 1)
    assert len(ran) == 2 and all(r is not None for r in ran)  # gate_up and down, each all experts at once
    monkeypatch.setattr(OutputModel, "_experts_nvfp4", lambda *a, **k: None)
    slow = _built(m, 1)
    assert fast[0].keys() == slow[0].keys()
    for k in fast[0]:
        a, b = fast[0][k], slow[0][k]
        assert a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b)), k
    assert fast[1].keys() == slow[1].keys()
    for k, q in fast[1].items():
        assert (q is None) == (slow[1][k] is None), k
        if q is not None:
            assert q[0] == slow[1][k][0] and all((x is None and y is None) or torch.equal(x, y)
                                                 for x, y in zip(q[1:], slow[1][k][1:], strict=True)), k
    assert fast[2] == slow[2] and len(fast[2]) == 1 and "experts.1.up_proj" in fast[2][0]
    assert fast[3] == slow[3]
    m.close()
