"""evaluate(): the figures of a checkpoint against itself, of NVFP4 / FP8-block / W4A4 outputs, of a damaged output,
both layouts alike, bad inputs refused, and the whole-model check with transformers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from engine.core.errors import CheckpointError, SamplesError
from engine.eval.streaming import evaluate
from tests.fixtures_ckpt import copy_ckpt

FIGURES = ("kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agree", "ppl_source", "ppl_output", "tokens")
DAMAGED = "model.layers.1.mlp.experts.1.up_proj"  # a routed expert of the MoE layer (layer 0 is dense)


def _eval(out, src, samples, **kw):
    return evaluate(out, src, samples, device="cpu", **kw)


def _bf16_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_checkpoint_against_an_exact_copy_of_itself(eval_src, eval_samples, tmp_path):
    r = _eval(_bf16_copy(eval_src, tmp_path / "copy"), eval_src, eval_samples)
    assert r["kld_mean"] == 0 and r["kld_max"] == 0 and r["top1_agree"] == 1.0
    assert r["ppl_source"] == r["ppl_output"] and math.isfinite(r["ppl_source"])
    assert [e["rel_err"] for e in r["layers"]] == [0.0, 0.0] and r["verdict"] == "pass"
    assert r["tokens"] > 0 and r["num_samples"] == 4
    assert r["mtp_skipped"] == ["model.layers.2"]  # the MTP layer is not run, and the report says so


def test_nvfp4_output_kld_positive_and_finite(nvfp4_out, eval_src, eval_samples):
    r = _eval(nvfp4_out / "modelopt", eval_src, eval_samples)
    for k in FIGURES:
        assert math.isfinite(r[k]), k
    assert r["kld_mean"] > 0 and r["kld_max"] >= r["kld_p99"] >= r["kld_median"] >= 0
    assert 0 < r["top1_agree"] <= 1
    assert r["weights"] == {"nvfp4": 18} and r["activations"] == []  # weight-only: inputs stay BF16
    assert [e["layer"] for e in r["layers"]] == [0, 1] and all(e["rel_err"] > 0 for e in r["layers"])
    assert r["warnings"] == []


def test_both_layouts_of_one_conversion_give_identical_figures(nvfp4_out, eval_src, eval_samples):
    a = _eval(nvfp4_out / "modelopt", eval_src, eval_samples)
    b = _eval(nvfp4_out / "compressed-tensors", eval_src, eval_samples)
    assert {k: a[k] for k in FIGURES} == {k: b[k] for k in FIGURES}
    assert a["layers"] == b["layers"]


def test_w4a4_both_layouts_identical_with_activations_quantized(w4a4_out, nvfp4_out, eval_src, eval_samples):
    a = _eval(w4a4_out / "modelopt", eval_src, eval_samples)
    b = _eval(w4a4_out / "compressed-tensors", eval_src, eval_samples)
    assert a["activations"] == ["nvfp4"] and any("FlashInfer" in n for n in a["emulates"])
    assert {k: a[k] for k in FIGURES} == {k: b[k] for k in FIGURES}
    assert a["layers"] == b["layers"]
    w = _eval(nvfp4_out / "modelopt", eval_src, eval_samples)
    # W4A4 quantizes attention too and adds the activations' error: every layer departs more than weight-only
    assert all(x["own_err"] > y["own_err"] for x, y in zip(a["layers"], w["layers"], strict=True))


def test_fp8_block_output(fp8_out, eval_src, eval_samples):
    r = _eval(fp8_out, eval_src, eval_samples)
    assert r["activations"] == ["fp8-group"] and r["weights"]["fp8"] > 0
    assert 0 < r["kld_mean"] < 1 and math.isfinite(r["kld_max"])


def _rewrite(out: Path, dst: Path, fn) -> Path:
    """A copy of `out` whose shard holding DAMAGED is rewritten by fn(state dict of that shard)."""
    from safetensors.torch import load_file, save_file

    d = copy_ckpt(out, dst.parent, dst.name)
    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    shard = d / idx[f"{DAMAGED}.weight"]
    sd = load_file(str(shard))
    fn(sd)
    save_file(sd, str(shard), metadata={"format": "pt"})
    return d


def _own_scale(sd):
    """up_proj re-encoded with its own global scale, twice gate_proj's: the codes and block scales fit that scale
    (a producer that gave w3 a scale of its own). vLLM reads w1's global scale for both: up comes out halved."""
    from engine.formats.nvfp4.helpers import dequant_nvfp4, quantize_nvfp4

    s2 = sd[f"{DAMAGED}.weight_scale_2"]
    w = dequant_nvfp4(sd[f"{DAMAGED}.weight"], sd[f"{DAMAGED}.weight_scale"], s2)
    packed, bs = quantize_nvfp4(w, s2 * 2)
    sd[f"{DAMAGED}.weight"], sd[f"{DAMAGED}.weight_scale"], sd[f"{DAMAGED}.weight_scale_2"] = packed, bs, s2 * 2


def test_an_up_proj_with_its_own_doubled_global_scale_fails_the_gate(nvfp4_out, eval_src, eval_samples, tmp_path):
    clean = _eval(nvfp4_out / "modelopt", eval_src, eval_samples)
    bad = _rewrite(nvfp4_out / "modelopt", tmp_path / "bad", _own_scale)
    gate = dict(max_kld_mean=1.3 * clean["kld_mean"], min_top1=0.0)
    r = _eval(bad, eval_src, eval_samples, **gate)
    assert r["kld_mean"] > 1.4 * clean["kld_mean"]
    assert r["verdict"] == "fail" and r["worst_layer"] == 1 and "KLD mean" in r["reasons"][0]
    assert r["layers"][0] == clean["layers"][0]  # layer 0 untouched
    assert r["layers"][1]["own_err"] > 1.3 * clean["layers"][1]["own_err"]
    assert any(DAMAGED in w and "w1" in w for w in r["warnings"])
    assert _eval(nvfp4_out / "modelopt", eval_src, eval_samples, **gate)["verdict"] == "pass"


def test_an_up_proj_global_scale_doubled_alone_is_read_with_w1s(nvfp4_out, eval_src, eval_samples, tmp_path):
    """Only the stored global scale doubled: vLLM reads gate's (w1's) for both, so the served model is the clean one;
    the report names the mismatch."""
    clean = _eval(nvfp4_out / "modelopt", eval_src, eval_samples)

    def double(sd):
        sd[f"{DAMAGED}.weight_scale_2"] = sd[f"{DAMAGED}.weight_scale_2"] * 2

    r = _eval(_rewrite(nvfp4_out / "modelopt", tmp_path / "bad", double), eval_src, eval_samples)
    assert {k: r[k] for k in FIGURES} == {k: clean[k] for k in FIGURES}
    assert len(r["warnings"]) == 1 and DAMAGED in r["warnings"][0]


def test_a_bad_samples_file(nvfp4_out, eval_src, tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('["fine", ""]')
    with pytest.raises(SamplesError) as e:
        _eval(nvfp4_out / "modelopt", eval_src, bad)
    assert "item 1 is an empty string" in e.value.msg and e.value.at == str(bad) and e.value.hint


def test_a_mismatched_against_model(nvfp4_out, tiny_ckpt, eval_samples):
    other = tiny_ckpt("deepseek-v3", "bf16", layers=3)
    with pytest.raises(CheckpointError) as e:
        _eval(nvfp4_out / "modelopt", other, eval_samples)
    assert "another model" in e.value.msg and "num_hidden_layers" in e.value.at and e.value.hint


def test_a_missing_shard(eval_src, eval_samples, tmp_path):
    out = copy_ckpt(eval_src, tmp_path, "out")
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        _eval(out, eval_src, eval_samples)
    assert "shard missing" in e.value.msg and e.value.at == str(shard) and e.value.hint


def _decompressed_by_compressed_tensors(ct_dir: Path, src: Path, dst: Path) -> Path:
    """The compressed-tensors output decoded by compressed-tensors' own NVFP4 decompressor, module by module, into a
    plain BF16 checkpoint with the source's config (nothing of quantdeck's decoders involved)."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file

    from engine.checkpoint.reader import CheckpointReader

    r = CheckpointReader(ct_dir)
    cfg = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(cfg).config_groups["group_0"]
    sd, parts = {}, ("weight_packed", "weight_scale", "weight_global_scale")
    for n in r.names():
        if n.endswith(".weight_packed"):
            b = n[: -len(".weight_packed")]
            w = NVFP4PackedCompressor.decompress({k: r.get(f"{b}.{k}") for k in parts}, scheme)["weight"]
            sd[b + ".weight"] = w.to(torch.bfloat16)
        elif n.rsplit(".", 1)[-1] not in parts + ("input_global_scale",):
            sd[n] = r.get(n)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json",
                                                            "manifest.json"))
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("decoder", ["quantdeck --to bf16", "compressed-tensors"])
def test_the_decoded_whole_model_gives_the_same_kld(nvfp4_out, eval_src, eval_samples, tmp_path, decoder):
    """Independent check: the output decoded to BF16 (by `quantdeck convert --to bf16`, or by compressed-tensors'
    own decompressor), the source and the decoded model each run whole by transformers (from_pretrained, the eager
    experts loop that the streamed layers run too), float32 log-probabilities of their logits: the same KLD as the
    streamed eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from console.cli import main

    dec = tmp_path / "dec"
    if decoder == "compressed-tensors":
        out = nvfp4_out / "compressed-tensors"
        _decompressed_by_compressed_tensors(out, eval_src, dec)
    else:
        out = nvfp4_out / "modelopt"
        assert main(["convert", "--src", str(out), "--dst", str(dec), "--to", "bf16"]) == 0
    streamed = _eval(out, eval_src, eval_samples)
    tok = AutoTokenizer.from_pretrained(str(eval_src))
    models = [AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16, experts_implementation="eager")
              .eval() for d in (eval_src, dec)]
    kld, agree = [], 0
    with torch.no_grad():
        for text in json.loads(eval_samples.read_text()):
            ids = torch.tensor([tok(text)["input_ids"]])
            ls, lo = (torch.log_softmax(m(input_ids=ids).logits[0].float(), -1) for m in models)
            kld.append((ls.exp() * (ls - lo)).sum(-1))
            agree += int((ls.argmax(-1) == lo.argmax(-1)).sum())
    k = torch.cat(kld).double()
    assert k.numel() == streamed["tokens"]
    assert float(k.mean()) == pytest.approx(streamed["kld_mean"], rel=1e-5, abs=1e-9)
    assert float(k.max()) == pytest.approx(streamed["kld_max"], rel=1e-5, abs=1e-9)
    assert agree / k.numel() == pytest.approx(streamed["top1_agree"])


def test_eval_reports_within_a_layer_so_a_working_stage_is_never_silent(nvfp4_out, eval_src, eval_samples,
                                                                           monkeypatch):
    """A progress event between batches at most every HEARTBEAT_S (0 here: after every batch)."""
    import engine.eval.streaming as es
    from engine.core.events import CallbackSink

    monkeypatch.setattr(es, "HEARTBEAT_S", 0.0)
    seen = []
    _eval(nvfp4_out / "modelopt", eval_src, eval_samples, batch_size=1, max_kld_mean=1e9, min_top1=0.0,
          sink=CallbackSink(seen.append))
    beats = [e.data.get("label", "") for e in seen if e.kind == "progress" and "batch" in (e.data.get("label") or "")]
    assert beats and beats[0].startswith("layer 1/") and "batch 1/" in beats[0]


def test_a_run_killed_after_a_layer_resumes_there_with_identical_figures(w4a4_out, eval_src, eval_samples, tmp_path,
                                                                         monkeypatch):
    import engine.eval.streaming as es

    whole = _eval(w4a4_out / "modelopt", eval_src, eval_samples)
    built: list[int] = []
    real = es.materialize_layer

    def dies_at_layer_1(family, hf_config, i, params, dev):
        built.append(i)
        if i == 1:
            raise KeyboardInterrupt  # as a kill would, with layer 0 done
        return real(family, hf_config, i, params, dev)

    state = tmp_path / "state"
    monkeypatch.setattr(es, "materialize_layer", dies_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        _eval(w4a4_out / "modelopt", eval_src, eval_samples, state_dir=state)
    assert json.loads((state / "progress.json").read_text())["next_layer"] == 1
    assert sorted(p.name for p in state.glob("acts-*")) == ["acts-out-1.safetensors", "acts-src-1.safetensors"]

    built.clear()
    monkeypatch.setattr(es, "materialize_layer", lambda *a: built.append(a[2]) or real(*a))
    resumed = _eval(w4a4_out / "modelopt", eval_src, eval_samples, state_dir=state)
    assert built == [1, 1]  # layer 1 of the source and of the output; layer 0 not again
    drop = ("seconds",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}

    # a state written for other inputs is set aside, not resumed from
    other = _eval(w4a4_out / "modelopt", eval_src, eval_samples, state_dir=state, seq_len=16)
    assert (state / "progress.json.stale").exists() and [e["layer"] for e in other["layers"]] == [0, 1]


def test_a_state_is_not_resumed_once_the_output_is_rewritten_or_torn(w4a4_out, eval_src, eval_samples, tmp_path,
                                                                     monkeypatch):
    import os

    import engine.eval.streaming as es

    out = tmp_path / "out"
    shutil.copytree(w4a4_out / "modelopt", out)
    real = es.materialize_layer

    def dies_at_layer_1(family, hf_config, i, params, dev):
        if i == 1:
            raise KeyboardInterrupt
        return real(family, hf_config, i, params, dev)

    state = tmp_path / "state"
    monkeypatch.setattr(es, "materialize_layer", dies_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        _eval(out, eval_src, eval_samples, state_dir=state)
    monkeypatch.setattr(es, "materialize_layer", real)
    shard = next(out.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # rewritten (export-only)
    built: list[int] = []
    monkeypatch.setattr(es, "materialize_layer", lambda *a: built.append(a[2]) or real(*a))
    _eval(out, eval_src, eval_samples, state_dir=state)
    assert built[:2] == [0, 0] and (state / "progress.json.stale").exists()  # started over at layer 0

    # a torn state (its activations gone) is set aside too, not an error on every retry
    shutil.rmtree(state)
    monkeypatch.setattr(es, "materialize_layer", dies_at_layer_1)
    with pytest.raises(KeyboardInterrupt):
        _eval(out, eval_src, eval_samples, state_dir=state)
    for f in state.glob("acts-*"):
        f.unlink()
    monkeypatch.setattr(es, "materialize_layer", real)
    r = _eval(out, eval_src, eval_samples, state_dir=state)
    assert [e["layer"] for e in r["layers"]] == [0, 1]
