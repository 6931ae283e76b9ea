"""An FP8 (DeepSeek block-128) checkpoint calibrates with weights dequantized on the fly: the amax equal
modelopt's whole-model flow on the BF16 dequantized copy (weight amax from values, never from FP8 codes)."""

import pytest
from calib_tiny_models import assert_amax_equal, reference_quantized_model, write_samples

from engine.calibrate import snapshot as snap
from engine.calibrate.layer_pass import layer_amax
from engine.calibrate.samples import load_samples
from engine.calibrate.streaming import calibrate


@pytest.mark.slow
def test_fp8_source_matches_modelopt_on_dequantized_copy(tmp_path):
    from engine.fixtures import build_fixture
    from tests.fixtures_ckpt import dequantized_copy

    src = build_fixture(tmp_path / "src", family="deepseek-v3", dtype="fp8", layers=2, experts=4, hidden=128,
                        mtp=True)
    bf16 = dequantized_copy(src, tmp_path / "bf16")
    samples = write_samples(tmp_path / "s.json", 4)
    summary = calibrate(src, samples, tmp_path / "amax", seq_len=24, batch_size=2, device="cpu")
    assert summary["layers"] == 2  # the MTP layer is not a decoder layer of the model
    s = load_samples(samples, tokenizer=src, seq_len=24)
    ref = layer_amax(reference_quantized_model(bf16, s.input_ids, batch_size=2))
    got = snap.load_amax(tmp_path / "amax")
    assert_amax_equal(ref, got)
    assert max(float(v) for k, v in got.items() if "weight_quantizer" in k) < 10  # not ~448 (raw FP8 codes)
