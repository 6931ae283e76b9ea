"""The expected-names memo: a finished calibration writes what `validate --amax` would get from modelopt, and the
check uses it only for the inputs it was written for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from engine.calibrate import snapshot as snap
from engine.calibrate.streaming import _memo, calibrate
from engine.calibrate.validate import (
    EXPECTED_MEMO_FORMAT,
    expected_key,
    expected_quantizers,
    validate_amax,
    write_expected_memo,
)

CFG = "deepseek-experts"


@pytest.fixture(scope="module")
def calibrated(v3_dir, samples_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("memo") / "amax"
    summary = calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=2, quant_cfg=CFG, device="cpu")
    assert summary["finished"] and "expected_memo_s" in summary["phases"]
    return out


def _copy(src, tmp_path, name="amax"):
    return shutil.copytree(src, tmp_path / name)


def test_a_finished_calibration_writes_what_modelopt_expects(calibrated, v3_dir):
    memo = json.loads((calibrated / snap.EXPECTED).read_text())
    assert memo["format"] == EXPECTED_MEMO_FORMAT
    assert memo["key"] == expected_key(v3_dir, CFG, [0, 1, 2])
    assert memo["quantizers"] == sorted(expected_quantizers(v3_dir, CFG, [0, 1, 2]))
    rep = validate_amax(calibrated, v3_dir)
    assert rep["ok"] and rep["expected_from"] == "memo" and rep["missing"] == rep["unexpected"] == []


def test_the_memo_decides_only_for_its_own_key(calibrated, v3_dir, tmp_path):
    """A memo whose names differ but whose key matches is what the check compares against (so it is used); the
    same memo beside a model whose config.json differs by one byte is ignored, and modelopt says the snapshot is
    fine."""
    amax = _copy(calibrated, tmp_path)
    memo = json.loads((amax / snap.EXPECTED).read_text())
    dropped = memo["quantizers"][0]
    memo["quantizers"] = memo["quantizers"][1:] + ["model.layers.0.mlp.made_up.weight_quantizer.amax"]
    (amax / snap.EXPECTED).write_text(json.dumps(memo))
    rep = validate_amax(amax, v3_dir)
    assert not rep["ok"] and rep["expected_from"] == "memo"
    assert rep["missing"] == ["model.layers.0.mlp.made_up.weight_quantizer.amax"] and rep["unexpected"] == [dropped]

    model = shutil.copytree(v3_dir, tmp_path / "model")
    (model / "config.json").write_bytes((v3_dir / "config.json").read_bytes() + b" ")
    rep = validate_amax(amax, model)
    assert rep["ok"] and rep["expected_from"] == "modelopt"


@pytest.mark.parametrize("memo", [b"{not json", b"\xff\xfe", b"[]", json.dumps({"format": 999}).encode(),
                                  None])
def test_an_unreadable_or_foreign_memo_is_ignored(calibrated, v3_dir, tmp_path, memo):
    amax = _copy(calibrated, tmp_path)
    p = amax / snap.EXPECTED
    if memo is None:  # the right key, names of the wrong type
        good = json.loads(p.read_text())
        p.write_text(json.dumps(dict(good, quantizers={"a": 1})))
    else:
        p.write_bytes(memo)
    rep = validate_amax(amax, v3_dir)
    assert rep["ok"] and rep["expected_from"] == "modelopt"


def test_a_failed_memo_is_a_warning(calibrated, tmp_path):
    """The memo is written after the snapshot is complete; a model directory it cannot read costs a warning."""
    amax = _copy(calibrated, tmp_path)
    (amax / snap.EXPECTED).unlink()
    events = []

    class Sink:
        def emit(self, kind, **d):
            events.append((kind, d))

    _memo(Sink(), "expected quantizer names", "inserted by the check", write_expected_memo, amax,
          tmp_path / "no-such-model", CFG, [0, 1, 2])
    assert not (amax / snap.EXPECTED).exists()
    assert [d["level"] for k, d in events if k == "log"] == ["warning"]
    msg = events[0][1]["msg"]
    assert msg.startswith("expected quantizer names not saved with the snapshot (") and "no-such-model" in msg
    assert msg.endswith("): inserted by the check")


CHILD = """
import json, sys
from engine.calibrate.validate import validate_amax
rep = validate_amax(sys.argv[1], sys.argv[2])
print(json.dumps({"loaded": sorted(m for m in ("torch", "modelopt", "transformers") if m in sys.modules),
                  "ok": rep["ok"], "from": rep["expected_from"], "quantizers": rep["quantizers"]}))
"""


def test_the_check_with_a_memo_imports_no_torch_modelopt_or_transformers(calibrated, v3_dir):
    p = subprocess.run([sys.executable, "-c", CHILD, str(calibrated), str(v3_dir)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["loaded"] == [] and got["ok"] and got["from"] == "memo"
    assert got["quantizers"] == len(snap.load_amax(calibrated))
