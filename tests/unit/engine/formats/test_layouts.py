"""Registered output layouts: names, specs without data, re-labelled canonical tensors, pack (input untouched),
configs vs the references (compressed-tensors, modelopt), imported without torch."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from engine.checkpoint.host import HostArray
from engine.checkpoint.safetensors_format import dtype_name
from engine.core.errors import FormatError, RegistryError
from engine.formats import Layout, Modules, layout_for
from engine.formats.compressed_tensors.layout import INPUT_OBSERVER
from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block
from engine.formats.nvfp4.dispatch import fp8_block_to_nvfp4
from engine.formats.nvfp4.helpers import dequant_nvfp4, global_scale, quantize_nvfp4, weight_amax


@pytest.fixture(scope="module")
def ct():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
        from compressed_tensors.quantization import QuantizationConfig
    return NVFP4PackedCompressor, QuantizationConfig


def _specs_match(layout, out, weight_shape, has_input):
    specs = layout.output_specs(weight_shape, has_input_scale=has_input)
    assert set(specs) <= set(out)
    for k, spec in specs.items():
        assert spec.name == k and dtype_name(out[k].dtype) == spec.dtype and tuple(out[k].shape) == spec.shape, k


MODULES = Modules(kept=("lm_head", "model.layers.0.mlp.gate"), quantized=("model.layers.0.mlp.up_proj",))


def test_registry_names_and_unknown():
    assert {"modelopt", "compressed-tensors", "fp8-block", "fp8-block-ue8m0", "bf16"} <= set(Layout.names())
    assert layout_for("nvfp4", "compressed_tensors") is Layout.get("compressed-tensors")
    assert layout_for("fp8-block", "modelopt") is Layout.get("fp8-block")
    assert layout_for("fp8-block", family="deepseek-v4") is Layout.get("fp8-block-ue8m0")
    assert layout_for("bf16", "compressed-tensors") is Layout.get("bf16")
    with pytest.raises(RegistryError, match="modelopt"):
        Layout.get("gguf")
    with pytest.raises(FormatError):
        layout_for("nvfp4")


def test_layouts_import_without_torch():
    """The torch-free CPU converter plans and writes through the layouts."""
    code = ("import sys; from engine.formats import Layout; Layout.names(); import engine.formats.nvfp4.names; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("has_input", [False, True])
def test_canonical_nvfp4_outputs_relabelled_as_the_layout_writes_them(name, has_input):
    """The converter's canonical (modelopt) specs and tensors become the layout's own, on torch and on the host."""
    layout, canonical = Layout.get(name), Layout.get("modelopt")
    m = "model.layers.1.mlp.experts.0.up_proj"
    specs = canonical.module_specs(m, (32, 64), has_input)
    assert [layout.out_spec(s) for s in specs.values()] == list(layout.module_specs(m, (32, 64), has_input).values())
    assert [layout.out_spec(s, nvfp4=False) for s in specs.values()] == list(specs.values())
    s2 = torch.tensor(0.00123, dtype=torch.float32)
    name_t, t = layout.out_tensor(f"{m}.weight_scale_2", s2)
    name_h, h = layout.out_tensor(f"{m}.weight_scale_2", HostArray("F32", np.asarray(s2.numpy())))
    assert name_t == name_h == f"{m}.{layout.tensor_names.global_scale}" and h.raw().tobytes() == t.numpy().tobytes()
    assert tuple(t.shape) == layout.scalar_shape and (t.item() == s2.item()) != layout.tensor_names.reciprocal
    bf16 = torch.zeros(4, 16, dtype=torch.bfloat16)  # a kept weight in an NVFP4 item keeps its name
    assert layout.out_tensor(f"{m}.weight", bf16)[0] == f"{m}.weight"


@pytest.mark.parametrize("name", ["modelopt", "compressed-tensors"])
@pytest.mark.parametrize("has_input", [False, True])
def test_nvfp4_pack_bytes_specs_and_input_untouched(name, has_input):
    layout = Layout.get(name)
    w = torch.randn(48, 80) * 0.1
    bias = torch.randn(48)
    s2 = global_scale(weight_amax(w) * 2)  # a fused group's shared scale
    state = {"weight": w, "bias": bias, "weight_scale_2": s2}
    if has_input:
        state["input_amax"] = torch.tensor(12.5)
    before = {k: v.clone() for k, v in state.items()}
    out = layout.pack(state)
    assert all(torch.equal(before[k], state[k]) for k in state) and set(state) == set(before)
    _specs_match(layout, out, (48, 80), has_input)
    assert torch.equal(out["bias"], bias)
    packed, bs = quantize_nvfp4(w, s2)
    pk = "weight" if name == "modelopt" else "weight_packed"
    assert torch.equal(out[pk], packed) and torch.equal(out["weight_scale"].view(torch.uint8), bs.view(torch.uint8))
    if name == "modelopt":
        assert torch.equal(out["weight_scale_2"], s2)
        assert not has_input or out["input_scale"].item() == pytest.approx(12.5 / 2688)
    else:
        assert torch.equal(out["weight_global_scale"], (1.0 / s2).reshape(1))
        assert not has_input or out["input_global_scale"].item() == pytest.approx(2688 / 12.5)


def test_prequantized_state_from_fused_kernel_and_module_names():
    q, s = cast_fp8_block(torch.randn(64, 96))
    s2 = global_scale(weight_amax(dequant_fp8_block(q, s)))
    packed, bs = fp8_block_to_nvfp4(q, s, s2, device="cpu")
    m = "model.layers.0.mlp.experts.3.gate_proj"
    out = Layout.get("modelopt").pack_module(
        m, {f"{m}.nvfp4_packed": packed, f"{m}.nvfp4_block_scale": bs, f"{m}.weight_scale_2": s2}
    )
    assert sorted(out) == [f"{m}.weight", f"{m}.weight_scale", f"{m}.weight_scale_2"]
    assert set(Layout.get("modelopt").module_specs(m, (64, 96))) == set(out)
    with pytest.raises(FormatError):
        Layout.get("modelopt").pack({"nvfp4_packed": packed, "nvfp4_block_scale": bs})
    with pytest.raises(FormatError):
        Layout.get("modelopt").pack({"weight": q})
    with pytest.raises(FormatError):
        Layout.get("modelopt").pack({"weight": torch.randn(4, 16), "input_amax": torch.tensor(0.0)})
    with pytest.raises(FormatError):
        Layout.get("modelopt").output_specs((16,))


def test_zero_weight_packs_with_unit_scales():
    out = Layout.get("compressed-tensors").pack({"weight": torch.zeros(8, 32)})
    assert out["weight_global_scale"].item() == 1.0 and (out["weight_scale"].float() == 1).all()


def test_compressed_tensors_decompresses_our_output_and_config_parses(ct):
    compressor, qconfig = ct
    layout = Layout.get("compressed-tensors")
    for weight_only in (True, False):
        pieces = layout.config(MODULES, w4a4=not weight_only)
        qc = pieces.quantization_config
        assert qc["ignore"] == list(MODULES.kept) and not pieces.files
        parsed = qconfig.model_validate(qc)
        dumped = parsed.model_dump(mode="json")
        assert {k: qc[k] for k in dumped if k in qc and k != "config_groups"} == \
            {k: dumped[k] for k in dumped if k in qc and k != "config_groups"}
        for key, ours in qc["config_groups"]["group_0"].items():  # compressed-tensors dumps fewer of the defaults
            theirs = dumped["config_groups"]["group_0"][key]
            assert (theirs == ours) if not isinstance(ours, dict) else {k: ours[k] for k in theirs} == theirs, key
        scheme = parsed.config_groups["group_0"]
        assert (scheme.input_activations is None) == weight_only
        names = set(compressor.compression_param_names(scheme))
        if not weight_only:  # CT registers input_global_scale [1] on the module for dynamic="local" tensor_group
            names.add("input_global_scale")
        assert names == set(layout.output_specs((32, 64), has_input_scale=not weight_only))
    w = torch.randn(32, 64)
    out = layout.pack({"weight": w})
    dec = compressor.decompress(dict(out), scheme)["weight"]
    ours = dequant_nvfp4(out["weight_packed"], out["weight_scale"], 1.0 / out["weight_global_scale"])
    assert torch.equal(dec, ours.to(dec.dtype))


def test_w4a4_input_observer_is_the_nvfp4_presets(ct):
    """What llm-compressor writes for an NVFP4 W4A4 checkpoint's input_activations: compressed-tensors' NVFP4
    preset (its observer set explicitly since 0.13, the version whose argument fields we write)."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    qc = Layout.get("compressed-tensors").config(MODULES, w4a4=True).quantization_config
    ours = qc["config_groups"]["group_0"]["input_activations"]
    preset = PRESET_SCHEMES["NVFP4"]["input_activations"].model_dump(mode="json")  # what a save writes
    assert ours["observer"] == INPUT_OBSERVER == preset["observer"] == "static_minmax"
    assert {k: ours[k] for k in preset} == preset


@pytest.mark.parametrize("weight_only", [True, False])
def test_modelopt_config_equals_modelopt_conversion(weight_only):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format
    modules = Modules(kept=("lm_head", "model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.o_proj"),
                      quantized=("model.layers.0.mlp.up_proj",))
    pieces = Layout.get("modelopt").config(modules, w4a4=not weight_only)
    hf = pieces.files["hf_quant_config.json"]
    assert hf["quantization"]["quant_algo"] == ("W4A16_NVFP4" if weight_only else "NVFP4")
    assert hf["quantization"]["exclude_modules"] == ["lm_head", "model.layers.0.self_attn*"]
    assert hf["quantization"]["group_size"] == 16 and hf["producer"]["name"] == "modelopt"
    qc = dict(pieces.quantization_config)
    assert qc.pop("written_by")["name"] == "quantdeck"
    assert qc == convert_hf_quant_config_format(hf)
    assert qc["quant_method"] == "modelopt"
    assert Layout.get("modelopt").config(Modules(kept=("lm_head",))).quantization_config is None


@pytest.mark.parametrize("name", ["fp8-block", "fp8-block-ue8m0"])
def test_fp8_block_layout(name):
    layout = Layout.get(name)
    w = torch.randn(200, 300).to(torch.bfloat16)
    out = layout.pack({"weight": w})
    _specs_match(layout, out, (200, 300), False)
    q, s = cast_fp8_block(w, ue8m0=name.endswith("ue8m0"))
    assert torch.equal(out["weight"].view(torch.uint8), q.view(torch.uint8))
    assert set(out) == {"weight", "scale" if name.endswith("ue8m0") else "weight_scale_inv"}
    again = layout.pack(dict(out))  # already FP8: kept as is
    assert again["weight"] is out["weight"]
    qc = layout.config(MODULES).quantization_config
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128] and qc["fmt"] == "e4m3"
    assert qc["activation_scheme"] == "dynamic" and "modules_to_not_convert" not in qc
    assert ("scale_fmt" in qc) == ("expert_dtype" in qc) == name.endswith("ue8m0")
    assert layout.config(Modules()).quantization_config is None


def test_bf16_layout():
    layout = Layout.get("bf16")
    out = layout.pack({"weight": torch.randn(4, 8), "bias": torch.ones(4)})
    _specs_match(layout, out, (4, 8), False)
    assert layout.config().quantization_config is None
    cfg = layout.output_config({"quantization_config": {"quant_method": "fp8"}, "dtype": "float8"}, layout.config())
    assert cfg == {"dtype": "bfloat16", "torch_dtype": "bfloat16"}
    with pytest.raises(FormatError):
        layout.pack({"weight": torch.zeros(4, 8).to(torch.float8_e4m3fn)})
