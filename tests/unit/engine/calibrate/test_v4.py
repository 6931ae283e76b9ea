"""DeepSeek V4 (native names, FP8 attention + MXFP4 experts, hyper-connections, compressor/indexer, hash
routing): layer-streaming amax equal modelopt's whole-model flow on the dequantized BF16 copy."""

import pytest
from calib_tiny_models import assert_amax_equal, reference_quantized_model, write_samples

from engine.calibrate import snapshot as snap
from engine.calibrate.layer_pass import layer_amax
from engine.calibrate.samples import load_samples
from engine.calibrate.streaming import calibrate


@pytest.mark.slow
def test_v4_fp8_mxfp4_source_matches_modelopt(tmp_path):
    from engine.fixtures import build_fixture
    from tests.fixtures_ckpt import dequantized_copy

    src = build_fixture(tmp_path / "src", family="deepseek-v4", dtype="fp8", layers=2, experts=4, hidden=128)
    bf16 = dequantized_copy(src, tmp_path / "bf16")
    samples = write_samples(tmp_path / "s.json", 4)
    out = tmp_path / "amax"
    calibrate(src, samples, out, seq_len=24, batch_size=2, device="cpu", layers=1)  # and resume
    assert calibrate(src, samples, out, seq_len=24, batch_size=2, device="cpu")["started_at_layer"] == 1
    s = load_samples(samples, tokenizer=src, seq_len=24)
    ref = layer_amax(reference_quantized_model(bf16, s.input_ids, batch_size=2))
    got = snap.load_amax(out)
    assert any("compressor" in k for k in got) and any("experts.gate_up_proj_weight_quantizers" in k for k in got)
    assert_amax_equal(ref, got)
    # export onto the native-named checkpoint: amax names mapped back through transformers' renamings
    import json

    from engine.export.api import export_checkpoint

    rep = export_checkpoint(src, out, tmp_path / "out", device="cpu")
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "layers.1.attn.wq_a.input_scale" in idx and "layers.1.ffn.experts.3.w2.input_scale" in idx
    assert not [k for k in idx if k.startswith("model.")]
    assert "layers.0.attn.compressor.wkv" in rep["calibrated_but_kept"]
    assert "layers.0.attn.compressor.wkv.input_scale" not in idx
    # the renamings came from the calibration's memo; asked of transformers again, the output is the same bytes
    from engine.calibrate.names_memo import NAMES_MEMO

    assert rep["names_from"] == "snapshot"
    (out / NAMES_MEMO).unlink()
    again = export_checkpoint(src, out, tmp_path / "again", device="cpu")
    assert again["names_from"] == "transformers"
    files = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert [f for f in files if (tmp_path / "out" / f).read_bytes() != (tmp_path / "again" / f).read_bytes()] == []
