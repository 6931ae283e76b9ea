"""Recipes: defaults serve one machine, every bad key is named with its file, `init` output loads."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.core.errors import RecipeError
from engine.core.names import OutputLayout, TargetFormat
from engine.runs.recipe import load_recipe, loads_recipe
from engine.runs.recipe_toml import dump_recipe, init_recipe_text


def test_minimal_recipe_has_single_machine_defaults():
    r = loads_recipe('[source]\npath = "/ckpt"\n')
    assert r.target.format is TargetFormat.NVFP4 and r.target.calibrate is False
    assert r.target.layouts == (OutputLayout.MODELOPT,)
    assert r.cluster.is_local and r.cluster.host_key_policy == "reject"
    assert r.push is None and r.calibration.num_samples == 128 and r.calibration.seq_len == 512
    assert r.device == "auto"


def test_issue_example_loads():
    text = '''
[run]
workdir = "/shared/quantdeck"
[source]
path = "/shared/ckpt/DeepSeek-V3"
[target]
format = "nvfp4"
calibrate = true
layouts = ["modelopt", "compressed-tensors"]
output = "/shared/out/DeepSeek-V3-NVFP4"
[calibration]
samples = "/shared/samples.json"
num_samples = 128
seq_len = 512
[cluster]
head = "node0"
python = "/opt/venv/bin/python"
nodes = [{ name = "node0", host = "10.0.0.1", gpus = 8 }]
[push]
target = "s3://bucket/prefix"
'''
    r = loads_recipe(text)
    assert r.cluster.head_node.host == "10.0.0.1" and r.cluster.head_node.gpus == 8
    assert r.push.target == "s3://bucket/prefix" and r.target.calibrate
    assert loads_recipe(dump_recipe(r)) == r  # round trip


@pytest.mark.parametrize("family", [None, "deepseek-v3", "deepseek-v4", "generic"])
def test_init_template_loads(family):
    r = loads_recipe(init_recipe_text(family))
    assert (r.model.family.value if r.model.family else None) == family


def test_init_with_samples_turns_calibration_on():
    r = loads_recipe(init_recipe_text(samples="/s.json", calibrate=True))
    assert r.target.calibrate and r.calibration.samples == "/s.json"


@pytest.mark.parametrize("text, key, words", [
    ('[source]\npath="x"\n[target]\nformat="nvfp5"', "target.format", "nvfp4"),
    ('[source]\npath="x"\n[target]\nfromat="nvfp4"', "target.fromat", "unknown key"),
    ('[run]\nworkdir="w"', "source", "missing"),
    ('[source]\npath="x"\n[target]\ncalibrate=true', "calibration.samples", "required"),
    ('[source]\npath="x"\n[target]\ncalibrate=true\nformat="fp8-block"', "target.calibrate", "nvfp4"),
    ('[source]\npath="x"\n[target]\nlayouts=[]', "target.layouts", "at least one"),
    ('[source]\npath="x"\n[target]\nlayouts=["modelopt","modelopt"]', "target.layouts", "twice"),
    ('[source]\npath="x"\n[cluster]\nhead="a"\nnodes=[{name="b"}]', "cluster.head", "not one of the nodes"),
    ('[source]\npath="x"\n[cluster]\nnodes=[{name="b", port=0}]', "cluster.nodes[0].port", "greater than"),
    ('[source]\npath="x"\n[cluster]\nhost_key_policy="yes"', "cluster.host_key_policy", "reject"),
    ('[source]\npath="x"\n[push]\ntarget="/local"', "push.target", "s3://"),
    ('[source]\npath="x"\n[calibration]\nnum_samples=0', "calibration.num_samples", "greater than"),
    ('[source]\npath=""', "source.path", "empty"),
    ('[source]\npath="x"\n[cluster]\nenv={HF_TOKEN="t"}', "cluster.env", "looks like a credential"),
    ('[source]\npath="x"\n[cluster]\nenv={"A B"="1"}', "cluster.env", "not a valid environment variable"),
])
def test_bad_recipes_name_file_and_key(text, key, words):
    with pytest.raises(RecipeError) as ei:
        loads_recipe(text, name="r.toml")
    line = ei.value.one_line()
    assert line.startswith(f"r.toml: {key}: "), line
    assert words in line


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "recipe.toml"
    p.write_text("[source\npath=1")
    with pytest.raises(RecipeError, match="recipe.toml: not valid TOML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.toml")


def test_recipe_is_frozen():
    r = loads_recipe('[source]\npath = "/ckpt"\n')
    with pytest.raises(ValidationError, match="Instance is frozen"):
        r.target.format = TargetFormat.BF16  # type: ignore[misc]


def test_cluster_env_and_ssh_settings_reach_the_cluster_spec():
    from remote.hosts import cluster_from

    r = loads_recipe('[source]\npath="x"\n[cluster]\nenv={PYTHONPATH="/opt/qd", NCCL_NVLS_ENABLE="0"}\n'
                     'known_hosts="/k"\nmaster_addr="10.0.0.1"\nnodes=[{name="n0", host="127.0.0.1"}]')
    spec = cluster_from(r.cluster)
    assert spec.env == {"PYTHONPATH": "/opt/qd", "NCCL_NVLS_ENABLE": "0"}
    assert spec.known_hosts == "/k" and spec.master_addr == "10.0.0.1"
