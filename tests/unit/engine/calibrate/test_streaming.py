"""Layer-streaming calibration equals modelopt's whole-model mtq.quantize on the same samples."""

import json

import pytest
import torch
from calib_tiny_models import assert_amax_equal, reference_quantized_model

from engine.calibrate import snapshot as snap
from engine.calibrate.layer_pass import layer_amax
from engine.calibrate.samples import load_samples
from engine.calibrate.streaming import calibrate
from engine.core.errors import CheckpointError, SamplesError


@pytest.fixture(scope="module")
def reference(v3_dir, samples_file):
    s = load_samples(samples_file, tokenizer=v3_dir, seq_len=24)
    return layer_amax(reference_quantized_model(v3_dir, s.input_ids, batch_size=2))


@pytest.mark.slow
def test_amax_equals_whole_model_modelopt(v3_dir, samples_file, reference, tmp_path):
    events = []

    class Sink:
        def emit(self, kind, **d):
            events.append((kind, d))

    out = tmp_path / "amax"
    summary = calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=2, device="cpu", sink=Sink())
    assert summary["finished"] and summary["layers"] == 3
    # every stored byte of the layers read once (plain pieces straight into the parameters on a host build)
    assert summary["bytes_read_per_rank"] == [summary["bytes_read"]]
    assert summary["layer_source_bytes"] <= summary["bytes_read"] <= 1.05 * summary["layer_source_bytes"]
    assert {"read_bg_s", "read_wait_s", "assemble_s", "build_s"} <= set(summary["phases"])
    assert_amax_equal(reference, snap.load_amax(out))
    assert any(k.endswith("gate_up_proj_weight_quantizers.7.amax") for k in reference)
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete" and man["num_samples"] == 6 and man["world_size"] == 1
    assert man["truncated"] >= 1 and man["tokens"] > 0 and len(man["samples_sha256"]) == 64
    assert man["model_fingerprint"] and man["versions"]["nvidia-modelopt"]
    cov = json.loads((out / "coverage.json").read_text())
    moe = cov["layers"]["model.layers.1.mlp.experts"]
    assert len(moe["tokens_per_expert"]) == 8
    assert moe["tokens"] > 0 and moe["tokens"] % 2 == 0  # every routed row picks top-2 experts
    progress = [d for k, d in events if k == "progress"]
    assert [p["done"] for p in progress] == [1, 2, 3] and progress[-1]["total"] == 3
    assert {p["scope"] for p in progress} == {"all"}  # every rank walks every layer: merged as the slowest rank
    assert not list((out / "acts").rglob("*.safetensors"))  # finished: no activations left behind


def test_killed_after_a_layer_resumes_to_the_same_amax(v3_dir, samples_file, reference, tmp_path):
    out = tmp_path / "amax"
    first = calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=2, device="cpu", layers=1)
    assert not first["finished"] and snap.done_layers(out) == [0]
    assert snap.acts_path(out, 0, 0).exists()
    second = calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=2, device="cpu")
    assert second["started_at_layer"] == 1 and second["finished"]
    assert_amax_equal(reference, snap.load_amax(out))
    with pytest.raises(CheckpointError, match="batch_size"):
        calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=3, device="cpu")


def test_all_experts_sees_every_expert_without_changing_outputs(v3_dir, samples_file, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    calibrate(v3_dir, samples_file, a, seq_len=24, batch_size=2, device="cpu", layers=2)
    calibrate(v3_dir, samples_file, b, seq_len=24, batch_size=2, device="cpu", layers=2, all_experts=True)
    for x, y in zip(snap.read_acts(a, 0, 1, 3), snap.read_acts(b, 0, 1, 3), strict=True):
        assert torch.equal(x, y)
    ra, _ = snap.read_layer(a, 1)
    rb, cov = snap.read_layer(b, 1)
    k = "model.layers.1.mlp.experts.down_proj_input_quantizer.amax"
    assert rb[k] >= ra[k]
    assert sum(cov["model.layers.1.mlp.experts"]) > 0


def test_onednn_cache_is_bounded_unless_the_operator_set_it(v3_dir, samples_file, tmp_path, monkeypatch):
    import os

    from engine.calibrate.streaming import ONEDNN_CACHE

    name, bound = ONEDNN_CACHE
    monkeypatch.setenv(name, "7")
    calibrate(v3_dir, samples_file, tmp_path / "a", seq_len=24, batch_size=2, device="cpu", layers=1)
    assert os.environ[name] == "7"
    monkeypatch.delenv(name)
    calibrate(v3_dir, samples_file, tmp_path / "b", seq_len=24, batch_size=2, device="cpu", layers=1)
    assert os.environ[name] == bound == "128"


def test_bad_samples_fail_before_the_model_is_touched(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text('["a", 1]')
    with pytest.raises(SamplesError, match="item 1"):
        calibrate(tmp_path / "no-such-model", bad, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
