"""`quantdeck convert / validate / inject-mtp` through the real CLI entry point (stdout data, stderr chatter,
exit codes from engine.core.errors)."""

from __future__ import annotations

import json

import torch

from console.cli import main
from engine.checkpoint import CheckpointReader, write_checkpoint
from engine.core.errors import ExitCode


def test_convert_validate_inject_cli(tiny_ckpt, tmp_path, capsys):
    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    out = tmp_path / "out"
    assert main(["convert", "--src", str(src), "--dst", str(out), "--to", "nvfp4", "--json"]) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)
    assert summary["outputs"] == {"modelopt": str(out)} and summary["quantized_modules"] > 0
    assert "progress:" in cap.err or "\r[" in cap.err

    assert main(["validate", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["format"] == "nvfp4"

    # break one tensor: validate exits with the validation code and names it
    r = CheckpointReader(out)
    tensors = {n: r.get(n).clone() for n in r.names()}
    bad_name = next(n for n in tensors if n.endswith(".weight_scale_2"))
    tensors[bad_name] = torch.tensor(float("nan"))
    bad = tmp_path / "bad"
    write_checkpoint(bad, tensors)
    for f in ("config.json", "hf_quant_config.json"):
        (bad / f).write_text((out / f).read_text())
    code = main(["validate", str(bad)])
    cap = capsys.readouterr()
    assert code == ExitCode.VALIDATION
    assert "quantdeck: error:" in cap.err and bad_name in cap.err and "FAIL" in cap.out

    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert main(["inject-mtp", str(out), str(tmp_path / "final")]) == 0
    assert "injected" in capsys.readouterr().out
    assert f"model.layers.{n}.shared_head.head.weight" in CheckpointReader(tmp_path / "final")


def test_convert_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    assert main(["convert", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o"), "--to", "bf16"]) \
        == ExitCode.INPUT
    err = capsys.readouterr().err
    assert err.startswith("quantdeck: error:") and "hint:" in err
    src = tiny_ckpt("deepseek-v3", "bf16")
    assert main(["convert", "--src", str(src), "--dst", str(tmp_path / "o"), "--to", "bf16",
                 "--shard-size", "lots"]) == ExitCode.USAGE


def test_unwritable_dst_and_dst_inside_src_are_one_line_errors(tiny_ckpt, tmp_path, capsys, make_unwritable):
    src = tiny_ckpt("deepseek-v3", "bf16")
    ro = tmp_path / "ro"
    ro.mkdir()
    make_unwritable(ro)
    for dst, fmt in ((ro / "out", "modelopt"), (ro / "out", "both")):
        assert main(["convert", "--src", str(src), "--dst", str(dst), "--to", "nvfp4", "--format", fmt,
                     "--device", "cpu"]) == ExitCode.INPUT
        err = capsys.readouterr().err
        assert err.startswith("quantdeck: error: cannot create") and str(ro / "out") in err and "hint:" in err
        assert "Traceback" not in err
    assert list(ro.iterdir()) == []
    assert main(["convert", "--src", str(src), "--dst", str(src / "out"), "--to", "nvfp4", "--device", "cpu"]) \
        == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "inside the source directory" in err and "outside the source directory" in err
    assert not (src / "out").exists() and not (src / "out.partial").exists()


def test_validate_against_a_different_model_is_refused_naming_the_field(tiny_ckpt, tmp_path, capsys):
    """Another model's shape is refused before any tensor is read: a bad input, not a failed checkpoint."""
    out = tmp_path / "out"
    assert main(["convert", "--src", str(tiny_ckpt("deepseek-v3", "bf16")), "--dst", str(out), "--to", "nvfp4",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    other = tiny_ckpt("deepseek-v3", "bf16", hidden=256)
    assert main(["validate", str(out), "--against", str(other)]) == ExitCode.INPUT
    err = capsys.readouterr().err
    assert f"{other}/config.json:hidden_size" in err and "is another model: its hidden_size is 256" in err
    assert "the checkpoint's is 128" in err and "Traceback" not in err
