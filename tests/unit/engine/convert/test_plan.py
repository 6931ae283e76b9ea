"""The conversion plan: what is quantized, kept, fused, excluded — decided before any data is read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import CheckpointReader
from engine.convert.plan import COPY, TO_BF16, TO_FP8, TO_NVFP4, build_plan
from engine.core.errors import FormatError
from engine.formats.modelopt.layout import exclude_patterns
from engine.models import detect_layout
from tests.fixtures_ckpt import copy_ckpt


def _plan(path, target="nvfp4", **kw):
    r = CheckpointReader(path)
    return r, build_plan(r, detect_layout(r.config, r.names()), target, **kw)


def test_v3_fp8_nvfp4_plan(tiny_ckpt):
    r, plan = _plan(tiny_ckpt("deepseek-v3", "fp8", mtp=True))
    by_key = {it.key: it for it in plan.items}
    groups = [it for it in plan.items if it.action == TO_NVFP4 and len(it.members) == 2]
    assert groups and all({m.name.rsplit(".", 2)[-2] for m in g.members} == {"gate_proj", "up_proj"} for g in groups)
    attn = [k for k in by_key if ".self_attn.q_a_proj.weight" in k]
    assert attn and all(by_key[k].action == TO_BF16 for k in attn)  # FP8 attention -> BF16, kept
    n = r.config["num_hidden_layers"]
    mtp_items = [it for it in plan.items if it.key.startswith(f"model.layers.{n}.")]
    assert mtp_items and all(it.action in (COPY, TO_BF16) for it in mtp_items)
    assert all(m.startswith(f"model.layers.{n}.") for m in plan.mtp_modules)
    assert "lm_head" in plan.kept_modules and not any("norm" in m for m in plan.kept_modules)
    pats = exclude_patterns(plan.modules)
    assert "model.layers.0.self_attn*" in pats and f"model.layers.{n}.*" in pats and "lm_head" in pats
    # every output tensor is known up front, and no scale companion survives as its own item
    assert not any(it.key.endswith("weight_scale_inv") for it in plan.items)
    outs = [s.name for it in plan.items for s in it.outputs]
    assert len(outs) == len(set(outs))


def test_quantize_attention_fuses_q_a_and_kv_a(tiny_ckpt):
    _, plan = _plan(tiny_ckpt("deepseek-v3", "bf16"), quantize_attention=True)
    fused = [sorted(m.name.rsplit(".", 2)[-2] for m in it.members) for it in plan.items
             if it.action == TO_NVFP4 and "self_attn" in it.key and len(it.members) == 2]
    assert fused and all(f == ["kv_a_proj_with_mqa", "q_a_proj"] for f in fused)
    assert not any("self_attn" in m for m in plan.kept_modules)


def test_fp8_block_and_bf16_targets(tiny_ckpt):
    _, plan = _plan(tiny_ckpt("deepseek-v3", "bf16"), "fp8-block")
    assert {it.action for it in plan.items} == {COPY, TO_FP8}
    fp8 = [it for it in plan.items if it.action == TO_FP8]
    assert all([s.dtype for s in it.outputs] == ["F8_E4M3", "F32"] for it in fp8)
    _, plan = _plan(tiny_ckpt("deepseek-v4", "fp8"), "bf16")
    assert {it.action for it in plan.items} <= {COPY, TO_BF16}
    assert all(s.dtype != "F8_E4M3" for it in plan.items for s in it.outputs)


def _edited(src, tmp_path, name, edit):
    """A copy of checkpoint `src` whose tensor `name` is replaced by edit(tensor) (None: dropped, and taken out
    of the index)."""
    dst = copy_ckpt(src, tmp_path, "edited")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shard = dst / index["weight_map"][name]
    tensors = load_file(shard)
    new = edit(tensors[name])
    if new is None:
        del tensors[name], index["weight_map"][name]
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = new
    save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def _refused(path, target, *words):
    with pytest.raises(FormatError) as e:
        _plan(path, target)
    text = e.value.one_line()
    assert all(w in text for w in words), text


def test_a_weight_without_its_scale_or_with_one_that_does_not_fit_is_refused_for_every_target(tiny_ckpt, tmp_path):
    """Decoded without its scale, or with another tensor's, a weight converts to wrong values and nothing says
    so: the plan refuses what `quantdeck inspect` reports, naming the tensor."""
    src = tiny_ckpt("deepseek-v3", "fp8", layers=2, experts=4, hidden=320, moe_inter=64)
    w = "model.layers.1.mlp.experts.0.gate_proj.weight"
    dropped = _edited(src, tmp_path / "a", w + "_scale_inv", lambda t: None)
    squashed = _edited(src, tmp_path / "b", w + "_scale_inv", lambda t: t[:1, :1].clone())
    e5m2 = _edited(src, tmp_path / "c", w, lambda t: t.to(torch.float32).to(torch.float8_e5m2))
    for target in ("nvfp4", "bf16", "fp8-block"):
        _refused(dropped, target, w, "has no scale companion")
        _refused(squashed, target, w + "_scale_inv", "does not fit")
        _refused(e5m2, target, w, "F8_E5M2", "not an encoding")
    _plan(src, "nvfp4")  # the unedited source plans


def test_v4_mxfp4_expert_without_its_scale_is_refused(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v4", "fp8", layers=2, experts=4, hidden=128, moe_inter=64, v4_experts="mxfp4")
    names = CheckpointReader(src).names()
    scale = next(n for n in names if ".experts.0.w1." in n and n.endswith(".scale"))
    dropped = _edited(src, tmp_path, scale, lambda t: None)
    for target in ("nvfp4", "bf16", "fp8-block"):
        _refused(dropped, target, scale.rsplit(".", 1)[0] + ".weight", "no scale companion")


def test_weights_whose_in_features_is_not_a_multiple_of_16_stay_in_bf16_and_are_excluded(tiny_ckpt, tmp_path):
    """NVFP4 packs whole 16-value groups; a padded last group loads in neither vLLM nor transformers (an
    exploratory run's compressed-tensors output failed `from_pretrained`). Such a weight is kept, listed in the
    exclusions, and the plan says so."""
    src = tiny_ckpt("deepseek-v3", "bf16", layers=2, experts=4, hidden=128, moe_inter=64)
    w = "model.layers.1.mlp.experts.2.down_proj.weight"
    odd = _edited(src, tmp_path, w, lambda t: t[:, :40].clone())
    _, plan = _plan(odd, "nvfp4")
    item = next(it for it in plan.items if it.members[0].name == w)
    assert item.action == COPY and "model.layers.1.mlp.experts.2.down_proj" in plan.kept_modules
    assert "model.layers.1.mlp.experts.2.down_proj" not in plan.quantized_modules
    assert any("not a multiple of 16" in n and w in n for n in plan.notes), plan.notes
    _, fine = _plan(src, "nvfp4")
    assert not fine.notes and "model.layers.1.mlp.experts.2.down_proj" in fine.quantized_modules
