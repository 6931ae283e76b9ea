"""Export's module names kept with the snapshot: written by the calibration, read only for the inputs they were
written for, and with them an export imports no transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.calibrate.names_memo import NAMES_MEMO, model_names, names_key, read_names_memo
from engine.calibrate.streaming import calibrate
from engine.checkpoint.reader import CheckpointReader

ROOT = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def calibrated(v3_dir, samples_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("names") / "amax"
    summary = calibrate(v3_dir, samples_file, out, seq_len=24, batch_size=2, device="cpu")
    assert summary["finished"] and "names_memo_s" in summary["phases"]
    return out


def _inputs(model_dir):
    r = CheckpointReader(model_dir)
    return r.config, set(r.names())


def test_the_memo_holds_what_transformers_says(calibrated, v3_dir):
    config, names = _inputs(v3_dir)
    layers = [0, 1]
    memo = read_names_memo(calibrated, names_key(v3_dir, config, names), layers)
    assert memo is not None
    asked = model_names(config, names, layers)
    assert memo.keep_fp32 == asked.keep_fp32 and memo.keep_fp32  # the router's bias, kept in float32
    assert memo.layers == asked.layers


def test_the_memo_is_read_only_for_its_inputs(calibrated, v3_dir, tmp_path):
    config, names = _inputs(v3_dir)
    key = names_key(v3_dir, config, names)
    assert read_names_memo(calibrated, key, [0]) is not None
    assert read_names_memo(calibrated, dict(key, transformers="0.0"), [0]) is None  # another transformers
    assert read_names_memo(calibrated, names_key(v3_dir, config, names | {"extra.weight"}), [0]) is None
    assert read_names_memo(calibrated, key, [0, 99]) is None  # a layer it does not hold
    bad = shutil.copytree(calibrated, tmp_path / "bad")
    (bad / NAMES_MEMO).write_text("{not json")
    assert read_names_memo(bad, key, [0]) is None


def test_a_memo_that_cannot_be_written_is_a_warning_naming_the_fallback(calibrated, v3_dir, tmp_path):
    from engine.calibrate.names_memo import write_names_memo
    from engine.calibrate.streaming import _memo

    config, names = _inputs(v3_dir)
    amax = shutil.copytree(calibrated, tmp_path / "amax")
    (amax / NAMES_MEMO).unlink()
    events = []

    class Sink:
        def emit(self, kind, **d):
            events.append((kind, d))

    _memo(Sink(), "export's module names", "export asks transformers itself", write_names_memo, amax,
          tmp_path / "no-such-model", config, names, [0, 1])
    assert not (amax / NAMES_MEMO).exists()
    assert [(k, d["level"]) for k, d in events] == [("log", "warning")]
    msg = events[0][1]["msg"]
    assert msg.startswith("export's module names not saved with the snapshot (") and "config.json" in msg
    assert msg.endswith("): export asks transformers itself")


CHILD = """
import json, sys
from engine.export.api import export_checkpoint
rep = export_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu")
print(json.dumps({"names_from": rep["names_from"], "transformers": "transformers" in sys.modules}))
"""


@pytest.mark.slow
def test_an_export_from_the_snapshot_imports_no_transformers(calibrated, v3_dir, tmp_path):
    def export(amax, dst):
        r = subprocess.run([sys.executable, "-c", CHILD, str(v3_dir), str(amax), str(dst)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert export(calibrated, tmp_path / "a") == {"names_from": "snapshot", "transformers": False}
    without = shutil.copytree(calibrated, tmp_path / "without")
    (without / NAMES_MEMO).unlink()
    assert export(without, tmp_path / "b") == {"names_from": "transformers", "transformers": True}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [f for f in files if (tmp_path / "a" / f).read_bytes() != (tmp_path / "b" / f).read_bytes()] == []
