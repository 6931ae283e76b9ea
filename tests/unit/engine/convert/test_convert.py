"""convert_checkpoint on tiny real DeepSeek fixtures: bytes against the numerics references, configs, layouts,
extras, index, shards, workers — and validate_checkpoint passes on every output."""

from __future__ import annotations

import json

import pytest
import torch

from engine.checkpoint import CheckpointReader
from engine.convert import convert_checkpoint
from engine.convert.validate import validate_checkpoint
from engine.convert.validate_ref import decode_module
from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block
from engine.formats.mxfp4.helpers import dequant_mxfp4
from engine.formats.nvfp4.helpers import global_scale, quantize_nvfp4


def _raw(t):
    return t.reshape(-1).view(torch.uint8)


def _src_fp32(r, base):
    w = r.get(base + ".weight")
    for sc in (base + ".weight_scale_inv", base + ".scale"):
        if sc in r:
            s = r.get(sc)
            return dequant_mxfp4(w, s) if w.dtype in (torch.uint8, torch.int8) else dequant_fp8_block(w, s)
    return w.float()


def _check_index(out):
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    r = CheckpointReader(out)  # strict: index and shards agree exactly
    assert set(idx["weight_map"]) == set(r.names())
    return r


@pytest.mark.slow
def test_v3_fp8_to_nvfp4_modelopt_bit_exact(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "fp8", mtp=True, hidden=320)
    s = convert_checkpoint(src, tmp_path / "out", to="nvfp4", shard_size="60KB")
    out = tmp_path / "out"
    assert s["shards"] > 1 and not (tmp_path / "out.partial").exists()
    r, sr = _check_index(out), CheckpointReader(src)
    bases = sorted(n[: -len(".weight_scale_2")] for n in r.names() if n.endswith(".weight_scale_2"))
    assert bases and not any("self_attn" in b for b in bases)
    groups: dict[str, list[str]] = {}
    for b in bases:
        groups.setdefault(b.rsplit(".", 1)[0] + (".du" if b.endswith("down_proj") else ".gu" + b), []).append(b)
    for b in bases:
        sib = [b] if b.endswith("down_proj") else [b, b.replace("gate_proj", "up_proj") if "gate_proj" in b
                                                   else b.replace("up_proj", "gate_proj")]
        s2 = global_scale(torch.stack([_src_fp32(sr, x).abs().amax() for x in sib]).amax())
        packed, bs = quantize_nvfp4(_src_fp32(sr, b), s2)
        assert torch.equal(r.get(b + ".weight"), packed), b
        assert torch.equal(_raw(r.get(b + ".weight_scale")), _raw(bs)), b
        assert torch.equal(r.get(b + ".weight_scale_2"), s2), b
    n = sr.config["num_hidden_layers"]
    assert r.meta(f"model.layers.{n}.self_attn.q_a_proj.weight").dtype == torch.bfloat16  # MTP kept BF16
    assert r.meta("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.bfloat16  # attention kept BF16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert f"model.layers.{n}.*" in hq["exclude_modules"] and "model.layers.0.self_attn*" in hq["exclude_modules"]
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / extra).read_bytes() == (src / extra).read_bytes()
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and set(man["weight_map"]) == set(r.names())
    rep = validate_checkpoint(out, against=src)
    assert rep["ok"], rep["failures"]


@pytest.mark.slow
def test_v4_fp8_both_layouts_mxfp4_lossless(tiny_ckpt, tmp_path):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src = tiny_ckpt("deepseek-v4", "fp8", mtp=True)
    s = convert_checkpoint(src, tmp_path / "out", to="nvfp4", layouts=["modelopt", "compressed-tensors"])
    assert set(s["outputs"]) == {"modelopt", "compressed-tensors"} and not s["notes"]
    mo = CheckpointReader(tmp_path / "out" / "modelopt")
    ct, sr = CheckpointReader(tmp_path / "out" / "compressed-tensors"), CheckpointReader(src)
    experts = sorted(n[: -len(".weight_scale_2")] for n in mo.names() if ".experts." in n and n.endswith("_scale_2"))
    assert experts
    for b in experts:  # MXFP4 -> NVFP4 lossless: decodes to exactly the source values
        assert torch.equal(decode_module(mo, b), _src_fp32(sr, b)), b
        w1 = b.rsplit(".", 1)[0]
        if b.endswith(".w1"):
            assert torch.equal(mo.get(b + ".weight_scale_2"), mo.get(w1 + ".w3.weight_scale_2"))
        assert torch.equal(ct.get(b + ".weight_packed"), mo.get(b + ".weight"))
    cfg = json.loads((tmp_path / "out" / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(cfg).config_groups["group_0"]
    assert cfg["config_groups"]["group_0"]["input_activations"] is None  # weight-only
    for b in experts[:4] + [n[: -len(".weight_global_scale")] for n in ct.names() if n.endswith("global_scale")][:4]:
        sd = {k: ct.get(f"{b}.{k}") for k in ("weight_packed", "weight_scale", "weight_global_scale")}
        theirs = NVFP4PackedCompressor.decompress(sd, scheme)["weight"].float()
        torch.testing.assert_close(theirs, decode_module(ct, b).to(theirs.dtype).float(), rtol=1e-2, atol=0)
    ignore = set(cfg["ignore"])
    kept = {n[: -len(".weight")] for n in ct.names()
            if n.endswith(".weight") and ct.meta(n).dtype_name in ("BF16", "F32", "F16")
            and len(ct.meta(n).shape) == 2 and "norm" not in n}
    assert kept and kept == ignore  # exactly what was really kept (attention, MTP, head, embed, router)
    for out in s["outputs"].values():
        rep = validate_checkpoint(out, against=src)
        assert rep["ok"], rep["failures"]


def test_fp8_block_from_bf16_and_bf16_from_fp8(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "bf16", hidden=320)
    convert_checkpoint(src, tmp_path / "f8", to="fp8-block")
    r, sr = _check_index(tmp_path / "f8"), CheckpointReader(src)
    w = "model.layers.0.self_attn.q_a_proj"
    q, sc = cast_fp8_block(sr.get(w + ".weight").float())
    assert torch.equal(_raw(r.get(w + ".weight")), _raw(q)) and torch.equal(r.get(w + ".weight_scale_inv"), sc)
    qc = json.loads((tmp_path / "f8" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    src8 = tiny_ckpt("deepseek-v4", "fp8")
    convert_checkpoint(src8, tmp_path / "b16", to="bf16")
    r, sr = _check_index(tmp_path / "b16"), CheckpointReader(src8)
    assert "quantization_config" not in json.loads((tmp_path / "b16" / "config.json").read_text())
    for n in r.names():
        if n.endswith(".weight") and n not in sr or sr.meta(n).dtype_name in ("F8_E4M3", "U8", "I8"):
            base = n[: -len(".weight")]
            assert torch.equal(r.get(n), _src_fp32(sr, base).to(torch.bfloat16)), n
        assert not n.endswith((".scale", ".weight_scale_inv"))


@pytest.mark.slow
def test_workers_and_resume_give_the_same_bytes(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "fp8")
    convert_checkpoint(src, tmp_path / "one", to="nvfp4", shard_size="40KB")
    s = convert_checkpoint(src, tmp_path / "two", to="nvfp4", shard_size="40KB", workers=2)
    assert s["shards"] >= 2
    for f in sorted(p.name for p in (tmp_path / "one").iterdir()):
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    again = convert_checkpoint(src, tmp_path / "two", to="nvfp4", shard_size="40KB")
    assert again["shards_written"] == 0  # already complete: nothing redone


def test_unknown_target_and_same_dst(tiny_ckpt, tmp_path):
    from engine.core.errors import UsageError

    src = tiny_ckpt("deepseek-v3", "bf16")
    with pytest.raises(UsageError, match="unknown target"):
        convert_checkpoint(src, tmp_path / "x", to="int4")
    with pytest.raises(UsageError, match="must differ"):
        convert_checkpoint(src, src, to="bf16")


def test_dst_inside_or_around_the_source_is_refused_before_anything_is_written(tiny_ckpt, tmp_path):
    """A --dst inside --src had its own half-built output copied into it as an "extra file" of the source."""
    from engine.core.errors import UsageError
    from tests.fixtures_ckpt import copy_ckpt

    src = copy_ckpt(tiny_ckpt("deepseek-v3", "bf16"), tmp_path, "src")  # writable, as an operator's would be
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for dst, layouts in ((src / "out", ("modelopt",)), (src / "out", ("modelopt", "compressed-tensors")),
                         (tmp_path, ("modelopt",))):
        with pytest.raises(UsageError) as ei:
            convert_checkpoint(src, dst, to="nvfp4", layouts=layouts, device="cpu")
        assert ei.value.at == "--dst" and "outside the source directory" in ei.value.hint
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_thread_counts_do_not_change_the_bytes(tiny_ckpt, tmp_path, monkeypatch):
    """One reader, compute and writer thread vs several of each (items of several shards in flight at
    once, written from several threads, computed out of order): identical files, manifest digests too."""
    src = tiny_ckpt("deepseek-v3", "fp8")
    outs = []
    for n, (r, c, w) in enumerate(((1, 1, 1), (3, 2, 3))):
        for k, v in (("READERS", r), ("COMPUTERS", c), ("WRITERS", w)):
            monkeypatch.setenv(f"QUANTDECK_{k}", str(v))
        out = tmp_path / f"o{n}"
        s = convert_checkpoint(src, out, to="nvfp4", layouts=("modelopt", "compressed-tensors"), shard_size="30KB")
        assert s["shards"] >= 3
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_v4_experts_encoding_in_the_config_follows_the_output(tiny_ckpt, tmp_path):
    """V4 as released says `expert_dtype: fp4` at the top of config.json, and transformers moves it into the
    quantization config: kept as it was, an FP8-block or BF16 output was labelled FP4 experts."""
    from transformers import AutoConfig

    from tests.fixtures_ckpt import copy_ckpt

    src = copy_ckpt(tiny_ckpt("deepseek-v4", "fp8"), tmp_path, "v4top")
    cfg = json.loads((src / "config.json").read_text())
    cfg["expert_dtype"] = cfg["quantization_config"].pop("expert_dtype", "fp4")
    (src / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(src, tmp_path / "f8", to="fp8-block")
    convert_checkpoint(src, tmp_path / "b16", to="bf16")
    f8 = json.loads((tmp_path / "f8" / "config.json").read_text())
    b16 = json.loads((tmp_path / "b16" / "config.json").read_text())
    assert "expert_dtype" not in f8 and f8["quantization_config"]["expert_dtype"] == "fp8"
    assert "expert_dtype" not in b16 and "quantization_config" not in b16
    assert AutoConfig.from_pretrained(tmp_path / "f8").quantization_config["expert_dtype"] == "fp8"


def test_a_shard_size_of_zero_or_less_is_refused_and_a_layout_that_does_not_apply_is_said(tiny_ckpt, tmp_path):
    from engine.core.errors import UsageError
    from engine.core.events import CallbackSink

    src = tiny_ckpt("deepseek-v3", "bf16")
    for bad in ("0", "-5GB", 0):
        with pytest.raises(UsageError, match="more than 0"):
            convert_checkpoint(src, tmp_path / "z", to="nvfp4", shard_size=bad)
    assert not (tmp_path / "z").exists() and not (tmp_path / "z.partial").exists()
    said = []
    convert_checkpoint(src, tmp_path / "f8", to="fp8-block", layouts=["modelopt", "compressed-tensors"],
                       sink=CallbackSink(lambda ev: said.append(ev.data.get("msg", ""))))
    assert any("--format compressed-tensors applies to --to nvfp4 only" in m for m in said), said
    assert (tmp_path / "f8" / "config.json").exists()  # one layout, in --dst itself


def test_extras_that_cannot_be_written_are_a_checkpoint_error_naming_the_file(tiny_ckpt, tmp_path, make_unwritable):
    """A permission problem met while copying the source's other files (tokenizer, generation config) names the
    file and says what to do, instead of a bare OSError."""
    from engine.convert import copy_extras
    from engine.core.errors import CheckpointError

    src = tiny_ckpt("deepseek-v3", "bf16")
    out = tmp_path / "o"
    out.mkdir()
    make_unwritable(out)
    with pytest.raises(CheckpointError, match="cannot copy") as e:
        copy_extras(src, out)
    assert str(out) in e.value.one_line() and e.value.hint
