"""Real processes: `quantdeck calibrate` as 2 torchrun ranks (gloo) and as a process killed after a layer.

Both must give the amax of modelopt's whole-model mtq.quantize on the same samples.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "engine" / "calibrate"))

from calib_tiny_models import assert_amax_equal, build_v3, reference_quantized_model, write_samples  # noqa: E402

from engine.calibrate import snapshot as snap  # noqa: E402
from engine.calibrate.layer_pass import layer_amax  # noqa: E402
from engine.calibrate.samples import load_samples  # noqa: E402
from engine.core.settings import fault_spec  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def subprocess_env(**extra):
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def model_and_samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib-int")
    return build_v3(d / "model", seed=1), write_samples(d / "samples.json")


def _cli(*args):
    return [sys.executable, "-m", "console", "calibrate", *map(str, args), "--device", "cpu", "--quiet"]


@pytest.mark.slow
def test_two_ranks_under_torchrun_match_modelopt(model_and_samples, tmp_path):
    model, samples = model_and_samples
    out = tmp_path / "amax"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "console", "calibrate", "--model", str(model), "--samples", str(samples), "--out", str(out),
           "--seq-len", "24", "--batch-size", "2", "--device", "cpu", "--quiet"]
    r = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["finished"]
    per_rank = summary["bytes_read_per_rank"]  # one read per node: each rank read about half of every layer
    assert len(per_rank) == 2 and abs(per_rank[0] - per_rank[1]) <= 0.02 * sum(per_rank)
    assert 0.99 * summary["layer_source_bytes"] <= sum(per_rank) <= 1.05 * summary["layer_source_bytes"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["world_size"] == 2
    s = load_samples(samples, tokenizer=model, seq_len=24)
    ref = layer_amax(reference_quantized_model(model, s.input_ids, batch_size=2, world_size=2))
    assert_amax_equal(ref, snap.load_amax(out))
    cov = json.loads((out / "coverage.json").read_text())
    assert cov["layers"]["model.layers.1.mlp.experts"]["tokens"] > 0


@pytest.mark.slow
def test_process_killed_after_a_layer_resumes(model_and_samples, tmp_path):
    model, samples = model_and_samples
    out = tmp_path / "amax"
    args = ("--model", model, "--samples", samples, "--out", out, "--seq-len", "24", "--batch-size", "1")
    r = subprocess.run(_cli(*args), env=subprocess_env(QUANTDECK_FAULTS=fault_spec(calibrate_die_after_layer=1)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 137, r.stderr[-2000:]
    assert snap.done_layers(out) == [0, 1] and snap.acts_path(out, 0, 1).exists()
    from engine.calibrate.streaming import calibrate  # the rerun, in-process (one interpreter start less)

    assert calibrate(model, samples, out, seq_len=24, batch_size=1, device="cpu")["started_at_layer"] == 2
    s = load_samples(samples, tokenizer=model, seq_len=24)
    assert_amax_equal(layer_amax(reference_quantized_model(model, s.input_ids, batch_size=1)), snap.load_amax(out))
