"""NVFP4 checkpoints as sources: re-laid between the modelopt and compressed-tensors layouts (same codes and
scales as a direct conversion to each), decoded to BF16 (modelopt's NVFP4QTensor.dequantize, bit for bit; a plain
model transformers loads), W4A4 input scales carried over; and the transformers trap `validate` warns about."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointReader
from engine.convert import convert_checkpoint
from engine.convert.plan import NVFP4, build_plan
from engine.convert.validate import validate_checkpoint
from engine.core.errors import FormatError
from engine.formats.nvfp4.helpers import dequant_nvfp4
from engine.models import detect_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calibrate"))

MO, CT = "modelopt", "compressed-tensors"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader(d)
    return {n: r.get(n) for n in r.names()}


def _json(d: Path, name: str):
    p = d / name
    return json.loads(p.read_text()) if p.exists() else None


def _assert_same_checkpoint(a: Path, b: Path, skip: set[str] = frozenset()) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for n in ta:
        if n not in skip:
            assert ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape, n
            assert torch.equal(_bytes(ta[n]), _bytes(tb[n])), n
    for f in ("config.json", "hf_quant_config.json"):
        assert _json(a, f) == _json(b, f), f


def _reciprocal(x: torch.Tensor) -> torch.Tensor:
    return (1.0 / x.to(torch.float32)).reshape(1)


def _assert_inverse_scales(mo: Path, ct: Path, direct_mo: Path) -> list[str]:
    """A compressed-tensors → modelopt re-lay: every tensor as the direct modelopt conversion, but a global or
    input scale, which is fp32(1/g): its reciprocal is g again, and it is the direct one or one ulp from it (fp32's
    reciprocal is not one-to-one there). Returns the scales that differ."""
    got, want, c = _tensors(mo), _tensors(direct_mo), _tensors(ct)
    differ = []
    for n, t in got.items():
        if not n.endswith((".weight_scale_2", ".input_scale")):
            assert torch.equal(_bytes(t), _bytes(want[n])), n
            continue
        g = c[n.replace(".weight_scale_2", ".weight_global_scale").replace(".input_scale", ".input_global_scale")]
        assert t.shape == () and torch.equal(_reciprocal(t), g), n
        if not torch.equal(t, want[n]):
            differ.append(n)
            a, b = np.float32(t.item()), np.float32(want[n].item())
            assert np.nextafter(a, b) == b, (n, a, b)  # one ulp apart
            assert torch.equal(_reciprocal(want[n]), g), n
    return differ


@pytest.fixture(scope="module")
def direct(tiny_ckpt, tmp_path_factory):
    """A tiny V3 FP8 checkpoint and its direct NVFP4 conversion to both layouts."""
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True)
    out = tmp_path_factory.mktemp("nvfp4_direct") / "out"
    convert_checkpoint(src, out, to="nvfp4", layouts=[MO, CT], device="cpu")
    return src, out / MO, out / CT


@pytest.mark.slow
def test_relaid_between_layouts_gives_the_direct_conversions_bytes(direct, tmp_path):
    src, mo, ct = direct
    convert_checkpoint(mo, tmp_path / "m2c", to="nvfp4", layouts=[CT], device="cpu")
    _assert_same_checkpoint(tmp_path / "m2c", ct)  # every tensor, config.json: exactly the direct conversion
    convert_checkpoint(tmp_path / "m2c", tmp_path / "m2c2m", to="nvfp4", layouts=[MO], device="cpu")
    _assert_inverse_scales(tmp_path / "m2c2m", ct, mo)
    _assert_same_checkpoint(tmp_path / "m2c2m", mo, skip={n for n in _tensors(mo) if n.endswith("_scale_2")})
    convert_checkpoint(tmp_path / "m2c2m", tmp_path / "m2c2m2c", to="nvfp4", layouts=[CT], device="cpu")
    _assert_same_checkpoint(tmp_path / "m2c2m2c", ct)  # and back again: the same bytes
    for d in ("m2c", "m2c2m"):
        rep = validate_checkpoint(tmp_path / d, against=src)
        assert rep["ok"], rep["failures"]


def _modelopt_decode(packed, bs, s2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    o, half = packed.shape
    q = NVFP4QTensor(torch.Size((o, half * 2)), torch.float32, packed)
    return q.dequantize(dtype=torch.float32, scale=bs, double_scale=s2, block_sizes={-1: 16})


@pytest.mark.slow
def test_decoded_to_bf16_bit_for_bit_and_loadable(direct, tmp_path):
    from transformers import AutoModelForCausalLM

    src, mo, ct = direct
    for lay, d in ((MO, mo), (CT, ct)):
        out = tmp_path / lay
        s = convert_checkpoint(d, out, to="bf16", device="cpu")
        assert not s["notes"]
        r, q = CheckpointReader(out), CheckpointReader(d)
        cfg = _json(out, "config.json")
        assert "quantization_config" not in cfg and not (out / "hf_quant_config.json").exists()
        assert all(r.meta(n).dtype_name != "U8" and not n.endswith(("_scale", "_scale_2", "_global_scale"))
                   for n in r.names())
        bases = [n[: -len(".weight_scale")] for n in q.names() if n.endswith(".weight_scale")]
        assert bases
        for b in bases:
            packed = q.get(b + (".weight" if lay == MO else ".weight_packed"))
            bs = q.get(b + ".weight_scale")
            s2 = (q.get(b + ".weight_scale_2") if lay == MO else 1.0 / q.get(b + ".weight_global_scale")).reshape(())
            ref = dequant_nvfp4(packed, bs, s2)
            assert torch.equal(ref, _modelopt_decode(packed, bs, s2)), b
            assert torch.equal(_bytes(r.get(b + ".weight")), _bytes(ref.to(torch.bfloat16))), b
        for n in r.names():  # what was not NVFP4 is copied as it is
            if n in q and n.rsplit(".", 1)[0] not in bases:
                assert torch.equal(_bytes(r.get(n)), _bytes(q.get(n))), n
        if lay == MO:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                   dtype=torch.bfloat16)
            mtp = f"model.layers.{cfg['num_hidden_layers']}."  # transformers has no MTP layer
            assert not [k for k in info["unexpected_keys"] if not k.startswith(mtp)]
            assert not info["missing_keys"] and not info["mismatched_keys"]
            gate = r.get("model.layers.1.mlp.experts.0.gate_proj.weight")
            assert torch.equal(model.model.layers[1].mlp.experts.gate_up_proj[0][: gate.shape[0]], gate)
    a, b = _tensors(tmp_path / MO), _tensors(tmp_path / CT)
    assert set(a) == set(b)  # both layouts decode to the same model (up to fp32(1/g) vs weight_scale_2, see above)


def _amax_dict(d: Path) -> Path:
    """A modelopt DeepSeek-example amax dict (native names) covering every GEMM of calib_tiny_models' V3."""
    sd = {}
    for w in ("w1", "w2", "w3"):
        sd[f"layers.0.ffn.{w}.input_quantizer._amax"] = torch.tensor(1.5)
        sd[f"layers.0.ffn.{w}.weight_quantizer._amax"] = torch.tensor(0.1)
        for layer in (1, 2):
            sd[f"layers.{layer}.ffn.shared_experts.{w}.input_quantizer._amax"] = torch.tensor(2.25)
            sd[f"layers.{layer}.ffn.shared_experts.{w}.weight_quantizer._amax"] = torch.tensor(0.1)
            for e in range(8):
                sd[f"layers.{layer}.ffn.experts.{e}.{w}.input_quantizer._amax"] = torch.tensor(3.0 + 0.37 * e)
                sd[f"layers.{layer}.ffn.experts.{e}.{w}.weight_quantizer._amax"] = torch.tensor(0.1)
    d.mkdir()
    torch.save(sd, d / "amax_dict_rank0-mp1.pt")
    return d


@pytest.mark.slow
def test_w4a4_export_relaid_keeps_its_input_scales(tmp_path):
    from calib_tiny_models import build_v3

    from engine.export.api import export_checkpoint

    model = build_v3(tmp_path / "model", seed=3)
    export_checkpoint(model, _amax_dict(tmp_path / "amax"), tmp_path / "w4a4", layouts=[MO, CT], device="cpu")
    mo, ct = tmp_path / "w4a4" / MO, tmp_path / "w4a4" / CT
    assert any(n.endswith(".input_global_scale") for n in _tensors(ct))
    convert_checkpoint(mo, tmp_path / "m2c", to="nvfp4", layouts=[CT], device="cpu")
    _assert_same_checkpoint(tmp_path / "m2c", ct)  # input_global_scale = 1/input_scale, W4A4 label: as exported
    convert_checkpoint(ct, tmp_path / "c2m", to="nvfp4", layouts=[MO], device="cpu")
    _assert_inverse_scales(tmp_path / "c2m", ct, mo)
    assert _json(tmp_path / "c2m", "hf_quant_config.json") == _json(mo, "hf_quant_config.json")
    assert _json(tmp_path / "c2m", "config.json") == _json(mo, "config.json")
    got, want = _tensors(tmp_path / "c2m"), _tensors(mo)
    scales = [n for n in want if n.endswith(".input_scale")]
    assert scales and all(n in got for n in scales)
    for d in (tmp_path / "m2c", tmp_path / "c2m"):
        rep = validate_checkpoint(d)
        assert rep["ok"], rep["failures"]


def test_packed_codes_without_a_global_scale_are_refused_naming_the_tensor(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.fixtures_ckpt import copy_ckpt

    src = tiny_ckpt("deepseek-v3", "bf16")
    d = tmp_path / "src"
    convert_checkpoint(src, d, to="nvfp4", layouts=[MO], device="cpu")
    r = CheckpointReader(d)
    victim = "model.layers.1.mlp.experts.0.down_proj.weight_scale_2"
    shard = r.meta(victim).shard
    r.close()
    bad = copy_ckpt(d, tmp_path, "bad")
    path = bad / Path(shard).name
    t = load_file(str(path))
    del t[victim]
    path.chmod(0o644)
    save_file(t, str(path), metadata={"format": "pt"})
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    del idx["weight_map"][victim]
    (bad / "model.safetensors.index.json").chmod(0o644)
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    (bad / "manifest.json").unlink(missing_ok=True)
    reader = CheckpointReader(bad)
    with pytest.raises(FormatError) as e:
        build_plan(reader, detect_layout(reader.config, reader.names()), "bf16")
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in e.value.at and "NVFP4" in e.value.msg
    ok = build_plan(CheckpointReader(d), detect_layout(reader.config, reader.names()), "bf16")
    assert any(m.encoding == NVFP4 for it in ok.items for m in it.members)


@pytest.mark.slow
def test_transformers_loads_compressed_tensors_moe_experts_as_packed_bytes_and_validate_warns(direct):
    """The trap, kept as evidence: transformers loads the compressed-tensors NVFP4 MoE without a warning or a
    missing key, but its fused routed experts hold the packed bytes; dense and shared experts decode right.
    `validate` says so as a warning (not a failure), and says nothing of the kind for the modelopt layout."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    src, mo, ct = direct
    sr = CheckpointReader(src)

    def source(name):
        w, s = sr.get(name + ".weight"), sr.get(name + ".weight_scale_inv")
        from engine.formats.fp8_block.helpers import dequant_fp8_block

        return dequant_fp8_block(w, s)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, info = AutoModelForCausalLM.from_pretrained(
            ct, output_loading_info=True, dtype=torch.bfloat16,
            quantization_config=CompressedTensorsConfig(dequantize=True))  # decompressed, to read the weights
    mtp = f"model.layers.{sr.config['num_hidden_layers']}."  # transformers has no MTP layer
    assert not [k for k in info["unexpected_keys"] if not k.startswith(mtp)]
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not [w for w in caught if "expert" in str(w.message).lower()]
    layer = model.model.layers[1].mlp
    gate = source("model.layers.1.mlp.experts.0.gate_proj")
    assert rel(layer.experts.gate_up_proj[0][: gate.shape[0]].detach(), gate) > 100  # garbage: the packed bytes
    shared_gate = source("model.layers.1.mlp.shared_experts.gate_proj")
    assert rel(layer.shared_experts.gate_proj.weight.detach(), shared_gate) < 0.2
    assert rel(model.model.layers[0].mlp.gate_proj.weight.detach(), source("model.layers.0.mlp.gate_proj")) < 0.2

    rep = validate_checkpoint(ct)
    assert rep["ok"] and len(rep["warnings"]) == 1
    w = rep["warnings"][0]
    assert w["check"] == "loaders" and "transformers" in w["msg"] and "mlp.experts.0." in w["msg"]
    assert "vLLM" in w["hint"] and "--to bf16" in w["hint"]
    assert validate_checkpoint(mo)["warnings"] == []
