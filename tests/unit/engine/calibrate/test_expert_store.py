"""A layer over the device budget calibrates with its routed experts kept as stored and decoded as they run:
the amax and the layer outputs are bit-identical to the resident build's (and so to modelopt's whole-model
flow, which the resident build is tested against)."""

import contextlib
import sys

import pytest
import torch
from calib_tiny_models import assert_amax_equal, write_samples

from engine.calibrate import expert_major, expert_store
from engine.calibrate import snapshot as snap
from engine.calibrate.family import LayerFamily
from engine.calibrate.layer import compute_dtype, materialize_layer
from engine.calibrate.layer_pass import Skeleton, layer_amax
from engine.calibrate.layer_reader import LayerReader
from engine.calibrate.qconfig import resolve_quant_cfg
from engine.calibrate.streaming import calibrate
from engine.checkpoint.reader import CheckpointReader
from engine.core.errors import CheckpointError


class Sink:
    def __init__(self):
        self.logs: list[str] = []

    def emit(self, kind, **d):
        if kind == "log":
            self.logs.append(d["msg"])
            assert d["level"] == ("warning" if "even so" in d["msg"] else "info")


def _small_window(monkeypatch) -> None:
    """3 experts at a time: with 4 experts, a window ends inside the layer."""
    monkeypatch.setattr(expert_store.ExpertStore, "window", property(lambda self: 3))


def _pair(src, samples, tmp_path, monkeypatch, **kw):
    """(resident, streamed) calibration summaries of `src` into tmp_path/a and tmp_path/b; the streamed run's log."""
    a = calibrate(src, samples, tmp_path / "a", seq_len=24, batch_size=2, device="cpu", **kw)
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    _small_window(monkeypatch)
    sink = Sink()
    b = calibrate(src, samples, tmp_path / "b", seq_len=24, batch_size=2, device="cpu", sink=sink, **kw)
    assert a["streamed_layers"] == [] and b["streamed_layers"] and b["expert_weights_decoded"] > 0
    return a, b, sink.logs


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek-v3", "deepseek-v4"])
def test_streamed_experts_give_the_resident_amax_and_outputs(tiny_ckpt, tmp_path, monkeypatch, family):
    src = tiny_ckpt(family=family, dtype="fp8", layers=3)  # V4: MXFP4 experts
    samples = write_samples(tmp_path / "s.json", 4)
    a, b, logs = _pair(src, samples, tmp_path, monkeypatch, layers=2)  # stopped: layer 1's outputs are kept
    streamed = [m for m in logs if "are decoded as they run" in m]
    assert len(streamed) == len(b["streamed_layers"]) and "exceeds the device budget of 0.0 GB" in streamed[0]
    assert "and even so it needs about" in streamed[0]  # a budget of 0 holds nothing
    assert_amax_equal(snap.load_amax(tmp_path / "a"), snap.load_amax(tmp_path / "b"), rel=0)
    assert any(".experts.down_proj_weight_quantizers.3.amax" in k for k in snap.load_amax(tmp_path / "b"))
    for x, y in zip(snap.read_acts(tmp_path / "a", 0, 1, 2), snap.read_acts(tmp_path / "b", 0, 1, 2), strict=True):
        assert torch.equal(x, y)


def test_all_experts_pass_streams_too(tiny_ckpt, tmp_path, monkeypatch):
    """The statistics-only all-experts pass runs every expert through the streamed forward as well."""
    src = tiny_ckpt(family="deepseek-v3", dtype="fp8", layers=2)
    samples = write_samples(tmp_path / "s.json", 4)
    _pair(src, samples, tmp_path, monkeypatch, all_experts=True)
    assert_amax_equal(snap.load_amax(tmp_path / "a"), snap.load_amax(tmp_path / "b"), rel=0)


def test_each_expert_is_decoded_once_per_layer_whatever_the_batches(tiny_ckpt, tmp_path, monkeypatch):
    """Every batch's experts run together (engine.calibrate.expert_major): the decodes do not grow with the batches,
    and the amax equal the resident build's."""
    src = tiny_ckpt(family="deepseek-v3", dtype="fp8", layers=3)
    samples = write_samples(tmp_path / "s.json", 6)
    resident = calibrate(src, samples, tmp_path / "r", seq_len=24, batch_size=1, device="cpu")
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    _small_window(monkeypatch)
    decoded = {}
    for bs in (1, 3):
        s = calibrate(src, samples, tmp_path / f"b{bs}", seq_len=24, batch_size=bs, device="cpu")
        assert s["streamed_layers"] == [1, 2] and resident["streamed_layers"] == []
        decoded[bs] = s["expert_weights_decoded"]
    assert decoded[1] == decoded[3] > 0  # 6 batches or 2: the same decodes
    assert_amax_equal(snap.load_amax(tmp_path / "r"), snap.load_amax(tmp_path / "b1"), rel=0)
    monkeypatch.setattr(expert_major, "GANG_MAX", 4)  # 6 batches: gangs of 4 and 2
    s = calibrate(src, samples, tmp_path / "g", seq_len=24, batch_size=1, device="cpu")
    assert s["expert_weights_decoded"] > decoded[1]
    assert_amax_equal(snap.load_amax(tmp_path / "r"), snap.load_amax(tmp_path / "g"), rel=0)


def _weight_amax(path, budget, i: int) -> dict:
    """Layer i's weight-quantizer amax from modelopt's weight pass alone (no forward: no expert sees a token)."""
    import modelopt.torch.quantization as mtq

    reader = CheckpointReader(path)
    family = LayerFamily.for_config(reader.config)
    hf_config = family.hf_config(reader.config)
    hf_config._experts_implementation = "eager"
    lr = LayerReader(reader, family, hf_config, compute_dtype(reader.config), torch.device("cpu"), range(i, i + 1),
                     budget=budget)
    try:
        raw = lr.read(i)
        layer = materialize_layer(family, hf_config, i, lr.assemble(raw), torch.device("cpu"))
    finally:
        lr.close()
    assert bool(raw.stores) == (budget == 0)
    expert_store.attach(layer, raw.stores)
    root = Skeleton(hf_config, i, layer)
    with contextlib.redirect_stdout(sys.stderr), \
            expert_store.streamed_quantizers() if raw.stores else contextlib.nullcontext():
        mtq.quantize(root, resolve_quant_cfg("NVFP4_DEFAULT_CFG"))
    expert_store.detach(layer, raw.stores)
    return {k: v for k, v in layer_amax(root).items() if "weight_quantizer" in k}


def test_the_weight_pass_reads_every_streamed_expert(tiny_ckpt, monkeypatch):
    """modelopt's weight pass (before any forward) gives every expert's weight amax from its decoded weights, as
    on the resident layer: an expert no token reaches keeps its weight amax."""
    src = tiny_ckpt(family="deepseek-v3", dtype="fp8", layers=2)
    resident = _weight_amax(src, None, 1)
    _small_window(monkeypatch)
    streamed = _weight_amax(src, 0, 1)
    experts = [k for k in resident if ".experts." in k]
    assert len(experts) == 2 * 4 and all(float(resident[k]) > 0 for k in experts)
    assert_amax_equal(resident, streamed, rel=0)


def test_an_unknown_modelopt_is_refused_with_what_to_do(tiny_ckpt, tmp_path, monkeypatch):
    src = tiny_ckpt(family="deepseek-v3", dtype="fp8", layers=2)
    samples = write_samples(tmp_path / "s.json", 4)
    monkeypatch.setitem(expert_store.KNOWN_MODELOPT, "iter_weights_for_calibration", {"0" * 16})
    expert_store._fused_experts_class.cache_clear()
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    try:
        with pytest.raises(CheckpointError, match="experts streamed") as e:
            calibrate(src, samples, tmp_path / "b", seq_len=24, batch_size=2, device="cpu")
        assert "QUANTDECK_LAYER_BUDGET_GB" in str(e.value)
    finally:
        expert_store._fused_experts_class.cache_clear()


def test_bf16_experts_do_not_stream(tiny_ckpt, tmp_path, monkeypatch):
    """BF16 experts of a BF16 model would take as much memory as stored: such a layer stays built whole."""
    src = tiny_ckpt(family="deepseek-v3", dtype="bf16", layers=2)
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    summary = calibrate(src, write_samples(tmp_path / "s.json", 4), tmp_path / "b", seq_len=24, batch_size=2,
                        device="cpu")
    assert summary["finished"] and summary["streamed_layers"] == []


def test_the_budget_defaults_and_override():
    assert expert_store.layer_budget(torch.device("cpu"), None) is None
    assert expert_store.layer_budget(torch.device("cpu"), 2.5) == 2_500_000_000


@pytest.mark.requires_gpu
def test_streamed_experts_on_the_gpu_give_the_resident_amax(tiny_ckpt, tmp_path, monkeypatch):
    """The same on a GPU: the parked batches' threads, their cuBLAS handles, the device decode."""
    src = tiny_ckpt(family="deepseek-v3", dtype="fp8", layers=3)
    samples = write_samples(tmp_path / "s.json", 6)
    calibrate(src, samples, tmp_path / "a", seq_len=24, batch_size=2, device="cuda")
    monkeypatch.setenv("QUANTDECK_LAYER_BUDGET_GB", "0")
    _small_window(monkeypatch)
    b = calibrate(src, samples, tmp_path / "b", seq_len=24, batch_size=2, device="cuda")
    assert b["streamed_layers"] == [1, 2]
    assert_amax_equal(snap.load_amax(tmp_path / "a"), snap.load_amax(tmp_path / "b"), rel=0)


def test_the_log_warns_only_where_even_the_streamed_layer_exceeds_the_budget(tiny_ckpt):
    from engine.calibrate.layer_pass import say_streamed

    reader = CheckpointReader(tiny_ckpt(family="deepseek-v3", dtype="fp8", layers=2))
    family = LayerFamily.for_config(reader.config)
    lr = LayerReader(reader, family, family.hf_config(reader.config), compute_dtype(reader.config),
                     torch.device("cpu"), range(1, 2), budget=0)
    try:
        raw = lr.read(1)
        lr.assemble(raw)
    finally:
        lr.close()
    built, _ = expert_store.expert_bytes(raw.plan)
    need = raw.plan.param_bytes - built + sum(s.nbytes for s in raw.stores.values()) \
        + expert_store.WINDOW_BYTES["cuda"] + raw.plan.nbytes
    for budget, level in ((need, "info"), (need - 1, "warning")):
        events = []
        say_streamed(SimpleSink(events), raw.plan, budget, raw.stores)
        assert [e["level"] for e in events] == [level] and "layer 1: " in events[0]["msg"]


class SimpleSink:
    def __init__(self, events):
        self.events = events

    def emit(self, kind, **d):
        self.events.append(d)
