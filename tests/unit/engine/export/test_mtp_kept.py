"""A checkpoint with an MTP layer: calibration leaves it out (as modelopt's flows do), export keeps it in BF16,
unquantized and excluded in both layouts."""

import json

import pytest
import torch
from calib_tiny_models import build_v3, write_samples
from safetensors.torch import load_file, save_file

from engine.calibrate import snapshot as snap
from engine.calibrate.streaming import calibrate
from engine.calibrate.validate import validate_amax
from engine.export.api import export_checkpoint

pytestmark = pytest.mark.slow


def _with_mtp(d):
    """A 3-layer V3 whose checkpoint also holds layer 3 as DeepSeek's MTP block (decoder + eh_proj, norms, head)."""
    model = build_v3(d / "model", seed=3, num_hidden_layers=4)
    t = load_file(str(model / "model.safetensors"))
    h = t["model.embed_tokens.weight"].shape[1]
    g = torch.Generator().manual_seed(0)
    t.update({"model.layers.3.eh_proj.weight": torch.randn(h, 2 * h, generator=g).to(torch.bfloat16),
              "model.layers.3.enorm.weight": torch.ones(h, dtype=torch.bfloat16),
              "model.layers.3.hnorm.weight": torch.ones(h, dtype=torch.bfloat16),
              "model.layers.3.shared_head.norm.weight": torch.ones(h, dtype=torch.bfloat16),
              "model.layers.3.shared_head.head.weight": t["lm_head.weight"].clone(),
              "model.layers.3.embed_tokens.weight": t["model.embed_tokens.weight"].clone()})
    save_file(t, str(model / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(num_hidden_layers=3, num_nextn_predict_layers=1)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def test_mtp_layer_not_calibrated_and_kept_bf16_excluded(tmp_path):
    model = _with_mtp(tmp_path)
    logs = []

    class Sink:
        def emit(self, kind, **d):
            if kind == "log":
                logs.append(d["msg"])

    summary = calibrate(model, write_samples(tmp_path / "s.json"), tmp_path / "amax", seq_len=16, batch_size=3,
                        device="cpu", sink=Sink())
    assert summary["finished"] and summary["layers"] == 3
    assert summary["mtp_layers_not_calibrated"] == ["model.layers.3"]
    assert any("MTP layer(s) ['model.layers.3'] not calibrated" in m for m in logs)
    amax = snap.load_amax(tmp_path / "amax")
    assert amax and not [k for k in amax if k.startswith("model.layers.3.")]
    assert validate_amax(tmp_path / "amax", model)["ok"]

    rep = export_checkpoint(model, tmp_path / "amax", tmp_path / "out", layouts=["modelopt", "compressed-tensors"],
                            device="cpu")
    assert "model.layers.3.mlp.experts.0.gate_proj" in rep["mtp_kept"] and "model.layers.3.self_attn.o_proj" in \
        rep["mtp_kept"]
    for lay in ("modelopt", "compressed-tensors"):
        out = tmp_path / "out" / lay
        got = {}
        for f in out.glob("*.safetensors"):
            got.update(load_file(str(f)))
        mtp = {k: v for k, v in got.items() if k.startswith("model.layers.3.")}
        assert mtp and all(v.dtype in (torch.bfloat16, torch.float32) for v in mtp.values())
        assert not [k for k in mtp if "scale" in k or k.endswith("weight_packed")]
        assert torch.equal(mtp["model.layers.3.eh_proj.weight"], load_file(str(model / "model.safetensors"))[
            "model.layers.3.eh_proj.weight"])
        assert [k for k in got if k.startswith("model.layers.2.mlp.experts.0.gate_proj.") and "scale" in k]
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        if lay == "modelopt":
            hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
            assert "model.layers.3.*" in hq["exclude_modules"] and "model.layers.3.*" in qc["ignore"]
        else:
            assert {"model.layers.3.eh_proj", "model.layers.3.mlp.experts.0.down_proj"} <= set(qc["ignore"])
