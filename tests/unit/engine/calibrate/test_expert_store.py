"""A layer over the device budget calibrates with its routed experts kept as stored and decoded as they run:
the amax and the layer outputs are bit-identical to the resident build's (and so to modelopt's whole-model
flow, which the resident build is tested against)."""

import pytest
import torch
from calib_tiny_models import assert_amax_equal, write_samples

from engine.calibrate import expert_store
from engine.calibrate import snapshot as snap
from engine.calibrate.streaming import calibrate
from engine.core.errors import CheckpointError


class Sink:
    def __init__(self):
        self.logs: list[str] = []

    def emit(self, kind, **d):
        if kind == "log":
            self.logs.append(d["msg"])


def _pair(src, samples, tmp_path, monkeypatch, **kw):
    """(resident, streamed) calibrations of `src` into tmp_path/a and tmp_path/b; the streamed run's log."""
    a = calibrate(src, samples, tmp_path / "a", seq_len=24, batch_size=2, device="cpu", **kw)
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    monkeypatch.setattr(expert_store, "_window", lambda params, device: 3)  # 4 experts: a window ends inside
    sink = Sink()
    b = calibrate(src, samples, tmp_path / "b", seq_len=24, batch_size=2, device="cpu", sink=sink, **kw)
    return a, b, sink.logs


@pytest.mark.slow
@pytest.mark.parametrize("source", ["v3-fp8", "v4-fp8-mxfp4"])
def test_streamed_experts_give_the_resident_amax_and_outputs(tiny_ckpt, tmp_path, monkeypatch, source):
    family, layers = ("deepseek-v3", 3) if source == "v3-fp8" else ("deepseek-v4", 3)
    src = tiny_ckpt(family=family, dtype="fp8", layers=layers)
    samples = write_samples(tmp_path / "s.json", 4)
    a, b, logs = _pair(src, samples, tmp_path, monkeypatch, layers=2)  # stopped: layer 1's outputs are kept
    streamed = [m for m in logs if "are decoded as they run" in m]
    assert streamed and "exceeds the device budget of 0.0 GB" in streamed[0]
    assert b["phases"]["experts_decoded"] > 0 and "experts_decoded" not in a["phases"]
    assert_amax_equal(snap.load_amax(tmp_path / "a"), snap.load_amax(tmp_path / "b"), rel=0)
    assert any(".experts.down_proj_weight_quantizers.3.amax" in k for k in snap.load_amax(tmp_path / "b"))
    for x, y in zip(snap.read_acts(tmp_path / "a", 0, 1, 2), snap.read_acts(tmp_path / "b", 0, 1, 2), strict=True):
        assert torch.equal(x, y)


def test_all_experts_pass_streams_too(tiny_ckpt, tmp_path, monkeypatch):
    """The statistics-only all-experts pass runs every expert through the streamed forward as well."""
    src = tiny_ckpt(family="deepseek-v3", dtype="bf16", layers=2)
    samples = write_samples(tmp_path / "s.json", 4)
    _pair(src, samples, tmp_path, monkeypatch, all_experts=True)
    assert_amax_equal(snap.load_amax(tmp_path / "a"), snap.load_amax(tmp_path / "b"), rel=0)


def test_an_unknown_modelopt_is_refused_with_what_to_do(tiny_ckpt, tmp_path, monkeypatch):
    src = tiny_ckpt(family="deepseek-v3", dtype="bf16", layers=2)
    samples = write_samples(tmp_path / "s.json", 4)
    monkeypatch.setitem(expert_store.KNOWN_MODELOPT, "iter_weights_for_calibration", {"0" * 16})
    expert_store._fused_experts_class.cache_clear()
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    try:
        with pytest.raises(CheckpointError, match="experts streamed") as e:
            calibrate(src, samples, tmp_path / "b", seq_len=24, batch_size=2, device="cpu")
        assert "QUANTDECK_LAYER_BUDGET_GB" in str(e.value)
    finally:
        monkeypatch.undo()
        expert_store._fused_experts_class.cache_clear()
    assert expert_store.supported()


def test_the_budget_defaults_and_override():
    assert expert_store.layer_budget(torch.device("cpu"), None) is None
    assert expert_store.layer_budget(torch.device("cpu"), 2.5) == 2_500_000_000
