"""The modelopt layout exported from a quantdeck amax snapshot equals modelopt's own export_hf_checkpoint."""

import contextlib
import fnmatch
import json
import sys

import pytest
import torch
from calib_tiny_models import build_v3, reference_quantized_model, write_samples
from safetensors import safe_open

from engine.calibrate.samples import load_samples
from engine.calibrate.streaming import calibrate
from engine.core.errors import ValidationFailedError
from engine.export.api import export_checkpoint
from engine.export.scales import ModuleAmax, plan_input_scales

pytestmark = pytest.mark.slow


def _tensors(d):
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] \
        if (d / "model.safetensors.index.json").exists() else None
    out = {}
    files = sorted(set(idx.values())) if idx else [p.name for p in d.glob("*.safetensors")]
    for f in files:
        with safe_open(str(d / f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from modelopt.torch.export import export_hf_checkpoint

    d = tmp_path_factory.mktemp("export")
    model = build_v3(d / "model", seed=2)
    samples = write_samples(d / "s.json")
    calibrate(model, samples, d / "amax", seq_len=24, batch_size=2, device="cpu")
    s = load_samples(samples, tokenizer=model, seq_len=24)
    ref = reference_quantized_model(model, s.input_ids, batch_size=2)
    with contextlib.redirect_stdout(sys.stderr):
        export_hf_checkpoint(ref, export_dir=str(d / "ref"))
    report = export_checkpoint(model, d / "amax", d / "ours", layouts=["modelopt", "compressed-tensors"],
                               device="cpu")
    return d, report


def test_same_tensors_bytes_and_scales_as_modelopt_export(exported):
    d, report = exported
    ref, ours = _tensors(d / "ref"), _tensors(d / "ours" / "modelopt")
    assert set(ref) == set(ours), (sorted(set(ref) - set(ours))[:6], sorted(set(ours) - set(ref))[:6])
    n_scales = 0
    for k, r in ref.items():
        o = ours[k]
        assert (r.dtype, tuple(r.shape)) == (o.dtype, tuple(o.shape)), k
        if k.endswith((".input_scale", ".weight_scale_2")):
            n_scales += 1
            assert torch.allclose(r.float(), o.float(), rtol=1e-6, atol=0), (k, r, o)
        else:
            assert torch.equal(r.view(torch.uint8) if r.element_size() == 1 else r,
                               o.view(torch.uint8) if o.element_size() == 1 else o), k
    assert n_scales > 100
    assert report["quantize_attention"] and report["filled_from_siblings"] == {}


def test_equivalent_hf_quant_config(exported):
    d, _ = exported
    ref = json.loads((d / "ref" / "hf_quant_config.json").read_text())["quantization"]
    ours = json.loads((d / "ours" / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    assert (ours["quant_algo"], ours["group_size"], ours["kv_cache_quant_algo"]) == \
        (ref["quant_algo"], ref["group_size"], ref["kv_cache_quant_algo"]) == ("NVFP4", 16, None)
    names = [k[: -len(".weight")] for k in _tensors(d / "ref") if k.endswith(".weight")]

    def excluded(pats):
        return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)}

    assert excluded(ours["exclude_modules"]) == excluded(ref["exclude_modules"])
    cfg = json.loads((d / "ours" / "modelopt" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == "NVFP4"


def test_compressed_tensors_layout_holds_reciprocal_input_scales(exported):
    d, _ = exported
    mo, ct = _tensors(d / "ours" / "modelopt"), _tensors(d / "ours" / "compressed-tensors")
    k = "model.layers.1.mlp.experts.3.down_proj"
    assert torch.allclose(ct[k + ".input_global_scale"], 1.0 / mo[k + ".input_scale"].reshape(1))
    assert torch.equal(ct[k + ".weight_packed"], mo[k + ".weight"])
    qc = json.loads((d / "ours" / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    ia = qc["config_groups"]["group_0"]["input_activations"]
    assert qc["format"] == "nvfp4-pack-quantized" and ia["dynamic"] == "local" and ia["group_size"] == 16


def test_expert_without_tokens_gets_siblings_max_and_nothing_is_zero():
    mods = [f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(3)] + ["model.layers.1.self_attn.o_proj"]
    ma = ModuleAmax(input={mods[0]: 2.0, mods[1]: 0.0, mods[3]: 1.0})
    ma.input[mods[2]] = 3.0
    sp = plan_input_scales(mods, {}, ma)
    assert sp.input_amax[mods[1]] == 3.0 and mods[1] in sp.filled and len(sp.filled) == 1
    ma2 = ModuleAmax(input={mods[3]: 0.0})
    sp2 = plan_input_scales([mods[3]], {}, ma2)
    from engine.export.scales import check_scales

    with pytest.raises(ValidationFailedError, match="no usable activation amax"):
        check_scales(sp2)


def test_fused_groups_share_the_input_scale():
    g = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    sp = plan_input_scales(g, {"k": g}, ModuleAmax(input={g[0]: 1.0, g[1]: 4.0}))
    assert sp.input_amax[g[0]] == sp.input_amax[g[1]] == 4.0
