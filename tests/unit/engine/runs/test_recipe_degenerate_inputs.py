"""Degenerate inputs are refused with one line naming the file and key (or tensor) and what to do: recipe numbers
that are zero, negative or not finite, samples files that leave nothing to calibrate on, checkpoints whose
config.json and tensors disagree, and a `validate --against` source of another model. Thin calibration (too few
tokens per expert) is only a warning."""

from __future__ import annotations

import json

import pytest

from engine.core.errors import CheckpointError, RecipeError, SamplesError
from engine.runs.recipe import loads_recipe
from tests.fixtures_ckpt import copy_ckpt

BASE = '[source]\npath = "/ckpt"\n'


@pytest.mark.parametrize("section, line, key, words", [
    ("calibration", "num_samples = 0", "calibration.num_samples", "greater than or equal to 1 (got 0)"),
    ("calibration", "seq_len = -512", "calibration.seq_len", "(got -512)"),
    ("calibration", "batch_size = 0", "calibration.batch_size", "(got 0)"),
    ("calibration", 'quant_cfg = " "', "calibration.quant_cfg", "must not be empty"),
    ("calibration", 'samples = ""', "calibration.samples", "must not be empty"),
    ("cluster", "gpus_per_node = 0", "cluster.gpus_per_node", "(got 0)"),
    ("cluster", "gpus_per_node = -8", "cluster.gpus_per_node", "(got -8)"),
    ("cluster", "nodes = [{ name = \"a\", gpus = -1 }]", "cluster.nodes[0].gpus", "(got -1)"),
    ("cluster", "nodes = [{ name = \"\" }]", "cluster.nodes[0].name", "must not be empty"),
    ("cluster", "connect_timeout = 0", "cluster.connect_timeout", "greater than 0"),
    ("cluster", 'python = ""', "cluster.python", "must not be empty"),
    ("target", "shard_mb = 0", "target.shard_mb", "greater than 0"),
    ("target", "shard_mb = -1.5", "target.shard_mb", "(got -1.5)"),
    ("target", "shard_mb = nan", "target.shard_mb", "finite"),
    ("run", "disk_margin = -0.1", "run.disk_margin", "(got -0.1)"),
    ("run", 'workdir = ""', "run.workdir", "must not be empty"),
    ("push", 'target = "s3://b/p"\npart_size_mb = 0', "push.part_size_mb", "(got 0)"),
    ("push", 'target = "s3://b/p"\nconcurrency = 0', "push.concurrency", "(got 0)"),
])
def test_zero_negative_and_empty_recipe_values_name_the_key(section, line, key, words):
    with pytest.raises(RecipeError) as ei:
        loads_recipe(f"{BASE}[{section}]\n{line}\n", name="r.toml")
    err = ei.value
    assert err.at == f"r.toml: {key}"
    assert err.one_line().startswith(f"r.toml: {key}: ") and words in err.msg, err.one_line()
    assert "\n" not in err.one_line()


def test_stall_timeout_must_be_positive():
    from engine.runs.recipe import RunSection

    if "stall_after_s" not in RunSection.model_fields:
        pytest.skip("no [run] stall_after_s in this recipe schema")
    for bad in ("0", "-60"):
        with pytest.raises(RecipeError) as ei:
            loads_recipe(f"[run]\nstall_after_s = {bad}\n{BASE}", name="r.toml")
        assert ei.value.at == "r.toml: run.stall_after_s" and f"(got {bad})" in ei.value.msg


# --- samples -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, name, words", [
    ("[]", "s.json", "holds no samples (an empty list)"),
    ('["", "   ", "\\n"]', "s.json", "item 0 is an empty string"),
    ("   \n\t\n", "s.json", "the samples file is empty"),
    ('{"text": "  "}\n', "s.jsonl", "line 1: \"text\" is an empty string"),
    ('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": ""}]}\n', "s.jsonl",
     "line 1: every message's content is empty"),
])
def test_samples_that_leave_nothing_are_refused(tmp_path, body, name, words):
    from engine.calibrate.samples import read_samples_file

    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(SamplesError) as ei:
        read_samples_file(p)
    assert ei.value.at == str(p) and words in ei.value.msg, ei.value.one_line()
    assert ei.value.hint


def test_fewer_tokens_than_one_batch_is_refused(tmp_path, tiny_ckpt):
    from engine.calibrate.samples import load_samples

    src = tiny_ckpt("deepseek-v3", "bf16")
    p = tmp_path / "s.json"
    p.write_text(json.dumps(["hello there", "a second short prompt"]))
    with pytest.raises(SamplesError) as ei:
        load_samples(p, tokenizer=src, seq_len=64, batch_size=2)
    err = ei.value
    assert err.at == str(p)
    assert "2 sample(s) hold" in err.msg and "fewer than one batch (batch_size 2 x seq_len 64 = 128)" in err.msg
    assert "lower calibration.seq_len" in err.hint
    s = load_samples(p, tokenizer=src, seq_len=4, batch_size=1)  # a batch of 4 tokens: enough
    assert s.tokens >= 4


def test_too_few_tokens_per_expert_is_a_warning_not_an_error():
    from engine.calibrate.samples import thin_expert_warning

    cfg = {"n_routed_experts": 256, "num_experts_per_tok": 8}
    w = thin_expert_warning(1000, cfg)
    assert w and "1000 tokens x top-8 over 256 routed experts is 31.2 tokens per expert" in w
    assert "all_experts" in w
    assert thin_expert_warning(256 * 32 // 8, cfg) is None
    assert thin_expert_warning(10, {"hidden_size": 64}) is None  # dense: no experts to starve


# --- checkpoints whose config and tensors disagree ----------------------------------------------------------

def _edit_config(path, **kw):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(kw)
    (path / "config.json").write_text(json.dumps(cfg))


def test_config_layers_and_hidden_size_against_the_tensors(tmp_path, tiny_ckpt):
    from engine.checkpoint import CheckpointReader
    from engine.models.inspect import inspect_checkpoint

    src = tiny_ckpt("deepseek-v3", "bf16")
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    width = CheckpointReader(src).meta("model.embed_tokens.weight").shape[1]

    more = copy_ckpt(src, tmp_path, "more-layers")
    _edit_config(more, num_hidden_layers=n + 2)
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(more)
    assert ei.value.at == f"{more / 'config.json'}:num_hidden_layers"
    assert f"config.json has num_hidden_layers={n + 2} but the tensors hold layers 0-{n - 1}" in ei.value.msg
    assert f"missing layers {n}-{n + 1}" in ei.value.msg

    fewer = copy_ckpt(src, tmp_path, "fewer-layers")
    _edit_config(fewer, num_hidden_layers=n - 1)
    with pytest.raises(CheckpointError, match=f"unexpected layers {n - 1}"):
        CheckpointReader(fewer)

    wide = copy_ckpt(src, tmp_path, "wide")
    _edit_config(wide, hidden_size=width * 2)
    with pytest.raises(CheckpointError) as ei:
        CheckpointReader(wide)
    assert ei.value.at == f"{wide / 'config.json'}:hidden_size"
    assert f"config.json has hidden_size={width * 2} but model.embed_tokens.weight is" in ei.value.msg
    assert f"(width {width})" in ei.value.msg and "config.json" in ei.value.hint

    # inspect reads on and reports it as an anomaly; the start of convert refuses before any output
    rep = inspect_checkpoint(wide)
    assert any(a.what == "config" and a.at.endswith("config.json:hidden_size") for a in rep.anomalies)
    assert not rep.ok
    from engine.convert import convert_checkpoint

    with pytest.raises(CheckpointError) as ei:
        convert_checkpoint(wide, tmp_path / "out", to="nvfp4", device="cpu")
    assert ei.value.at.endswith("config.json:hidden_size")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_calibrate_refuses_a_checkpoint_whose_config_disagrees(tmp_path, tiny_ckpt):
    from engine.calibrate.streaming import calibrate

    bad = copy_ckpt(tiny_ckpt("deepseek-v3", "bf16"), tmp_path)
    _edit_config(bad, num_hidden_layers=7)
    samples = tmp_path / "s.json"
    samples.write_text(json.dumps(["The quick brown fox jumps over the lazy dog."] * 8))
    with pytest.raises(CheckpointError) as ei:
        calibrate(bad, samples, tmp_path / "amax", seq_len=8, device="cpu")
    assert ei.value.at == f"{bad / 'config.json'}:num_hidden_layers" and "num_hidden_layers=7" in ei.value.msg
    assert not (tmp_path / "amax").exists()


# --- validate --against another model -------------------------------------------------------------------------

def test_validate_against_another_family_or_shape_names_both_values(tmp_path, tiny_ckpt, capsys):
    from console.cli import main

    v3 = tiny_ckpt("deepseek-v3", "bf16")
    v4 = tiny_ckpt("deepseek-v4", "bf16")
    capsys.readouterr()
    assert main(["validate", str(v3), "--against", str(v4)]) == 3
    err = capsys.readouterr().err
    t3 = json.loads((v3 / "config.json").read_text())["model_type"]
    t4 = json.loads((v4 / "config.json").read_text())["model_type"]
    assert err.count("\n") == 1 and err.startswith(f"quantdeck: error: {v4 / 'config.json'}:model_type: "), err
    assert f"its model_type is {t4!r}, the checkpoint's is {t3!r}" in err and "(hint: pass the source" in err

    from engine.checkpoint.consistency import refuse_other_model

    deeper = copy_ckpt(v3, tmp_path, "deeper")
    _edit_config(deeper, hidden_size=4096)
    with pytest.raises(CheckpointError) as ei:
        refuse_other_model(v3, deeper)
    assert ei.value.at == f"{deeper / 'config.json'}:hidden_size" and "its hidden_size is 4096" in ei.value.msg
    refuse_other_model(v3, v3)  # the same model passes
