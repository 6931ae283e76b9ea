"""`quantdeck eval` through the real CLI: the JSON report on stdout, progress on stderr, a failed gate exits 4 (a real
subprocess), bad inputs exit 3 with one error line naming the file."""

from __future__ import annotations

import json
import subprocess
import sys

from console.cli import main
from engine.core.errors import ExitCode
from tests.conftest import subprocess_env

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "def f(x):\n    return x * 2", "hello world 123"]
KEYS = ("kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agree", "ppl_source", "ppl_output", "tokens",
        "layers", "verdict", "worst_layer")


def test_eval_cli_json_and_gate(tiny_ckpt, tmp_path, capsys):
    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps(TEXTS))
    out = tmp_path / "nv"
    assert main(["convert", "--src", str(src), "--dst", str(out), "--to", "nvfp4"]) == 0
    capsys.readouterr()
    code = main(["eval", str(out), "--against", str(src), "--samples", str(samples), "--device", "cpu",
                 "--min-top1", "0", "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    rep = json.loads(cap.out)
    assert all(k in rep for k in KEYS) and rep["verdict"] == "pass"
    assert [set(e) >= {"layer", "rel_err"} for e in rep["layers"]] == [True, True]
    assert "progress:" in cap.err and "MTP layer(s) model.layers.2 skipped" in cap.err

    # the gate, in a real process: a KLD bound below the output's figure exits 4 with the figures on stdout
    p = subprocess.run([sys.executable, "-m", "console", "eval", str(out), "--against", str(src), "--samples",
                        str(samples), "--device", "cpu", "--max-kld-mean", str(rep["kld_mean"] / 2)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == ExitCode.VALIDATION, p.stderr
    assert "FAIL: KLD mean" in p.stdout and "layer " in p.stdout
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("quantdeck: error:")]
    assert len(err) == 1 and "quality gate failed" in err[0] and "hint:" in err[0]


def test_eval_cli_bad_inputs(tiny_ckpt, tmp_path, capsys):
    src = tiny_ckpt("deepseek-v3", "bf16")
    bad = tmp_path / "s.json"
    bad.write_text('{"prompt": "not a samples file"}')
    assert main(["eval", str(src), "--against", str(src), "--samples", str(bad)]) == ExitCode.INPUT
    err = capsys.readouterr().err
    assert f"quantdeck: error: {bad}" in err and "hint:" in err
    good = tmp_path / "g.json"
    good.write_text(json.dumps(TEXTS))
    other = tiny_ckpt("deepseek-v3", "bf16", hidden=256)
    assert main(["eval", str(src), "--against", str(other), "--samples", str(good)]) == ExitCode.INPUT
    assert "is another model" in capsys.readouterr().err
