"""Preflight's memory check: each rank's host and GPU needs from the model's config, checkpoint index and recipe.

The real-width checkpoint is DeepSeek-V3's tensor list (hidden 7168, 256 experts of 2048, 61 layers, FP8 with
128×128 block scales) as safetensors headers in sparse files of the right length: the planner reads headers
only, so no data is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.checkpoint.safetensors_format import TensorSpec, build_shard_map
from engine.runs.memory_check import NodeMemory
from engine.runs.memory_plan import GB
from engine.runs.preflight import run_preflight

V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
    "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "vocab_size": 129280, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16", "num_nextn_predict_layers": 0,
    "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def _fp8(name: str, out: int, inp: int) -> list[TensorSpec]:
    return [TensorSpec(name + ".weight", "F8_E4M3", (out, inp)),
            TensorSpec(name + ".weight_scale_inv", "F32", (math.ceil(out / 128), math.ceil(inp / 128)))]


def _v3_layer(i: int, c: dict) -> list[TensorSpec]:
    h, p = c["hidden_size"], f"model.layers.{i}."
    heads, qk = c["num_attention_heads"], c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    out = [TensorSpec(p + "input_layernorm.weight", "BF16", (h,)),
           TensorSpec(p + "post_attention_layernorm.weight", "BF16", (h,)),
           TensorSpec(p + "self_attn.q_a_layernorm.weight", "BF16", (c["q_lora_rank"],)),
           TensorSpec(p + "self_attn.kv_a_layernorm.weight", "BF16", (c["kv_lora_rank"],)),
           *_fp8(p + "self_attn.q_a_proj", c["q_lora_rank"], h),
           *_fp8(p + "self_attn.q_b_proj", heads * qk, c["q_lora_rank"]),
           *_fp8(p + "self_attn.kv_a_proj_with_mqa", c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
           *_fp8(p + "self_attn.kv_b_proj", heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
           *_fp8(p + "self_attn.o_proj", h, heads * c["v_head_dim"])]
    if i < c["first_k_dense_replace"]:
        f = c["intermediate_size"]
        return out + [*_fp8(p + "mlp.gate_proj", f, h), *_fp8(p + "mlp.up_proj", f, h),
                      *_fp8(p + "mlp.down_proj", h, f)]
    f, n = c["moe_intermediate_size"], c["n_routed_experts"]
    out += [TensorSpec(p + "mlp.gate.weight", "BF16", (n, h)),
            TensorSpec(p + "mlp.gate.e_score_correction_bias", "F32", (n,))]
    for e in ["shared_experts"] + [f"experts.{j}" for j in range(n)]:
        fe = f * c["n_shared_experts"] if e == "shared_experts" else f
        out += [*_fp8(p + f"mlp.{e}.gate_proj", fe, h), *_fp8(p + f"mlp.{e}.up_proj", fe, h),
                *_fp8(p + f"mlp.{e}.down_proj", h, fe)]
    return out


def headers_only_checkpoint(dst: Path, config: dict) -> Path:
    """config.json, model.safetensors.index.json and one shard per layer (headers, sparse data)."""
    dst.mkdir(parents=True)
    h, v = config["hidden_size"], config["vocab_size"]
    shards = {"model-00000.safetensors": [TensorSpec("model.embed_tokens.weight", "BF16", (v, h)),
                                          TensorSpec("model.norm.weight", "BF16", (h,)),
                                          TensorSpec("lm_head.weight", "BF16", (v, h))]}
    for i in range(config["num_hidden_layers"]):
        shards[f"model-{i + 1:05d}.safetensors"] = _v3_layer(i, config)
    weight_map = {}
    for name, specs in shards.items():
        shard = build_shard_map(specs, {"format": "pt"})
        with open(dst / name, "wb") as fh:
            fh.write(shard.header)
            fh.truncate(shard.total_size)  # sparse: the size the header promises, no data written
        weight_map.update({s.name: name for s in specs})
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def v3_real(tmp_path_factory) -> Path:
    return headers_only_checkpoint(tmp_path_factory.mktemp("v3real") / "DeepSeek-V3", V3)


def _recipe(tmp_path: Path, src: Path, cluster: str, *, device: str = "cuda", num_samples: int = 1024,
            seq_len: int = 4096, batch_size: int = 1) -> Path:
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps(["The quick brown fox jumps over the lazy dog. " * 20] * 8))
    p = tmp_path / "recipe.toml"
    p.write_text(f'[run]\nworkdir = "{tmp_path / "work"}"\ndevice = "{device}"\n[source]\npath = "{src}"\n'
                 f'[target]\noutput = "{tmp_path / "out"}"\ncalibrate = true\n'
                 f'[calibration]\nsamples = "{samples}"\nnum_samples = {num_samples}\nseq_len = {seq_len}\n'
                 f'batch_size = {batch_size}\n[eval]\nenable = false\n{cluster}')  # calibration's figures alone
    return p


def _node(gpus: int, cluster: str = "") -> str:
    return f'[cluster]\n{cluster}[[cluster.nodes]]\nname = "n0"\nhost = "127.0.0.1"\ngpus = {gpus}\n'


def _with_nodes(memory: dict[str, NodeMemory]):
    """An extra check standing in for remote.preflight.check_nodes: it records what each node has."""
    def check_nodes(facts) -> list[str]:
        facts.node_memory.update(memory)
        return []
    return check_nodes


def _memory_lines(fails: list[str]) -> list[str]:
    return [f for f in fails if f.startswith("memory: ")]


def test_v3_on_8_ranks_of_a_64gb_host_is_refused_with_numbers_and_fix(tmp_path, v3_real):
    report: dict = {}
    node = NodeMemory("n0", ram_total=64 * GB, ram_available=60 * GB, gpu_free=(80 * GB,) * 8)
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(8)), extra_checks=(_with_nodes({"n0": node}),),
                          report=report)
    mem = [f for f in _memory_lines(fails) if f.startswith("memory: calibrate ")]
    assert len(mem) == 1, fails  # calibrate's host RAM; its GPU need fits 80 GB
    line = mem[0]
    # 128 samples per rank × 4096 tokens × 7168 × 2 bytes × 2 buffers = 15.0 GB, + 2.0 imports + the embedding
    # (129280 × 7168 BF16, read on the host once; larger than the 0.4 GB read ring)
    assert line.startswith("memory: calibrate on n0: host RAM: need 18.9 GB per rank × 8 ranks = 151.1 GB, "
                           "the node has 64.0 GB"), line
    assert "(per rank: imports 2.0 + embedding 1.9 + activations 15.0)" in line
    assert "(fix: a smaller calibration.seq_len or num_samples (this node's samples take 120.3 GB), or more nodes" \
        in line
    assert "\n" not in line
    cal = next(m for m in report["memory"] if m["stage"] == "calibrate")
    assert "fewer ranks" not in line  # the node's share of the samples alone (120.3 GB) is more than it has
    assert cal["ranks"] == 8 and cal["device"] == "cuda" and cal["host_gb"] == 18.9
    assert cal["samples_per_rank"] == 128 and cal["params_layer"] == 3 and cal["stored_layer"] == 3
    # layer 3 (the first MoE layer): 256 + 1 experts × 3 × 7168 × 2048 in BF16, plus attention
    assert 22.9 <= cal["gpu_parts_gb"]["layer_params"] <= 23.4
    # its FP8 bytes and scales, as stored: half of that
    assert 11.4 <= cal["gpu_parts_gb"]["next_layer_stored"] <= 11.8
    assert cal["gpu_gb"] < 80


def test_v3_host_fix_names_the_ranks_that_fit(tmp_path, v3_real):
    node = NodeMemory("n0", ram_total=40 * GB, gpu_free=(80 * GB,) * 8)
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(8), num_samples=256, seq_len=2048),
                          extra_checks=(_with_nodes({"n0": node}),))
    line = _memory_lines(fails)[0]
    # 32 samples per rank × 2048 × 7168 × 4 = 1.9 GB, + 3.9 GB fixed: × 8 = 45.9 GB; 6 × 3.9 + 15.0 <= 40
    assert line.startswith("memory: calibrate on n0: host RAM: need 5.7 GB per rank × 8 ranks = 45.9 GB, the node "
                           "has 40.0 GB (per rank: imports 2.0 + embedding 1.9 + activations 1.9)"), line
    assert "(fix: fewer ranks per node: 6 fit (the node's gpus, or [cluster] gpus_per_node); a smaller " \
           "calibration.seq_len or num_samples" in line


def test_v3_one_rank_on_a_1tb_host_passes(tmp_path, v3_real):
    report: dict = {}
    notes: list[str] = []
    node = NodeMemory("n0", ram_total=1024 * GB, ram_available=1000 * GB, gpu_free=(80 * GB,))
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(1)), extra_checks=(_with_nodes({"n0": node}),),
                          report=report, notes=notes)
    assert _memory_lines(fails) == [], fails
    cal = next(m for m in report["memory"] if m["stage"] == "calibrate")
    assert cal["ranks"] == 1 and cal["samples_per_rank"] == 1024
    assert 120 < cal["host_gb"] < 125 and cal["gpu_gb"] < 80  # 1024 × 4096 × 7168 × 4 = 120.3 GB of activations


def test_v3_gpu_too_small_for_the_layer_names_the_expert_split(tmp_path, v3_real):
    node = NodeMemory("n0", ram_total=1024 * GB, gpu_free=(24 * GB,) * 8)
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(8), num_samples=64, seq_len=512),
                          extra_checks=(_with_nodes({"n0": node}),))
    mem = [f for f in _memory_lines(fails) if f.startswith("memory: calibrate ")]
    assert len(mem) == 1 and mem[0].startswith("memory: calibrate on n0: GPU memory: need "), fails
    assert "8 GPUs have as little as 24.0 GB free" in mem[0]
    assert "layer 3 alone" in mem[0] and "expert split" in mem[0] and 'run.device = "cpu"' in mem[0]


def test_v3_layer_over_the_gpu_streams_its_experts_where_they_fit_as_stored(tmp_path, v3_real):
    """36 GB built whole beside the next layer's bytes, 26 GB with the routed experts kept as FP8: a 32 GB GPU
    calibrates (a note says how), a 24 GB one does not (the failure says both figures)."""
    report: dict = {}
    notes: list[str] = []
    node = NodeMemory("n0", ram_total=1024 * GB, gpu_free=(32 * GB,))
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(1), num_samples=64, seq_len=512),
                          extra_checks=(_with_nodes({"n0": node}),), report=report, notes=notes)
    assert [f for f in _memory_lines(fails) if f.startswith("memory: calibrate ")] == [], fails
    cal = next(m for m in report["memory"] if m["stage"] == "calibrate")
    assert cal["gpu_gb"] > 32 >= cal["gpu_streamed_gb"]
    parts = cal["streamed_parts_gb"]
    assert 11.2 <= parts["experts_as_stored"] <= 11.4 and parts["layer_params"] < 1  # FP8 + scales; attention
    note = next(n for n in notes if n.startswith("memory: calibrate on n0: layer 3 built whole needs "))
    assert "its routed experts stay as stored and are decoded as they run" in note
    small = NodeMemory("n0", ram_total=1024 * GB, gpu_free=(24 * GB,))
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(1), num_samples=64, seq_len=512),
                          extra_checks=(_with_nodes({"n0": small}),))
    mem = [f for f in _memory_lines(fails) if f.startswith("memory: calibrate ")]
    assert len(mem) == 1 and f"nor with its routed experts kept as stored ({cal['gpu_streamed_gb']} GB" in mem[0]


def test_v3_batch_too_large_for_the_gpu_says_which_batch_fits(tmp_path, v3_real):
    node = NodeMemory("n0", ram_total=1024 * GB, gpu_free=(80 * GB,))
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(1), num_samples=64, seq_len=4096, batch_size=64),
                          extra_checks=(_with_nodes({"n0": node}),))
    mem = [f for f in _memory_lines(fails) if f.startswith("memory: calibrate ")]
    assert len(mem) == 1 and "GPU 0 has 80.0 GB free" in mem[0], fails
    assert "(fix: a smaller calibration.batch_size (" in mem[0] and " fits) or seq_len)" in mem[0]


def test_unknown_node_memory_is_a_note_not_a_failure(tmp_path, v3_real):
    notes: list[str] = []
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(8)), notes=notes)
    assert _memory_lines(fails) == [], fails
    assert any(n.startswith("memory: calibrate on n0: host RAM unknown, not checked (needs 18.9 GB per rank × 8 = "
                            "151.1 GB)") for n in notes), notes
    assert any("calibrate on n0: GPU memory unknown" in n for n in notes), notes


def test_recipe_gpu_memory_is_used_where_none_is_probed(tmp_path, v3_real):
    node = NodeMemory("n0", ram_total=1024 * GB)
    fails = run_preflight(_recipe(tmp_path, v3_real, _node(8, "gpu_memory_gb = 24\n"), num_samples=64,
                                  seq_len=512),
                          extra_checks=(_with_nodes({"n0": node}),))
    assert any("as little as 24.0 GB ([cluster] gpu_memory_gb)" in f for f in fails), fails


def test_tiny_checkpoint_passes_with_estimates(tmp_path, tiny_ckpt):
    report: dict = {}
    notes: list[str] = []
    src = tiny_ckpt("deepseek-v3", "fp8")
    fails = run_preflight(_recipe(tmp_path, src, "", device="cpu", num_samples=4, seq_len=64), report=report,
                          notes=notes)
    assert fails == []
    stages = {m["stage"]: m for m in report["memory"]}
    assert {"calibrate", "export"} <= set(stages)
    assert stages["calibrate"]["device"] == "cpu" and stages["calibrate"]["gpu_gb"] is None
    assert stages["calibrate"]["host_bytes"] > 2 * GB  # the imports, and a tiny layer


def test_cli_json_has_the_estimates(tmp_path, tiny_ckpt, capsys):
    from console.cli import main

    src = tiny_ckpt("deepseek-v3", "fp8")
    code = main(["preflight", str(_recipe(tmp_path, src, "", device="cpu", num_samples=4, seq_len=64)), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"] is True and out["failures"] == []
    cal = next(m for m in out["memory"] if m["stage"] == "calibrate")
    assert {"host_gb", "gpu_gb", "ranks", "host_node_gb", "host_parts_gb", "device"} <= set(cal)
    assert cal["host_parts_gb"]["imports"] == 2.0 and cal["device"] == "cpu" and cal["gpu_gb"] is None


def test_cli_json_refusal_still_has_the_estimates(tmp_path, v3_real, capsys):
    """This machine, CPU only: 1024 samples × 32768 tokens of activations (960 GB) do not fit its RAM."""
    from console.cli import main

    code = main(["preflight", str(_recipe(tmp_path, v3_real, "", device="cpu", seq_len=32768)), "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 5 and out["ok"] is False
    line = next(f for f in out["failures"] if f.startswith("memory: calibrate on "))
    assert ": host RAM: need 1006.9 GB per rank × 1 rank = 1006.9 GB, the node has " in line, line
    assert "layer parameters 23.0" in line and "activations 962.1" in line
    cal = next(m for m in out["memory"] if m["stage"] == "calibrate")
    assert cal["device"] == "cpu" and cal["host_gb"] > 990 and cal["gpu_gb"] is None
    assert "quantdeck: error: " in captured.err and "preflight check(s) failed" in captured.err



def test_node_memory_from_the_node_script_lines():
    """What remote.preflight's node script prints: MemTotal / MemAvailable in kB, then nvidia-smi's
    memory.total,memory.used per GPU in MiB (csv, noheader, nounits, spaces removed)."""
    from remote.preflight import node_memory

    m = node_memory("gpu0", {"mem": "1056164000 1003356000", "gpumem": "81559,0;81559,4023"})
    assert m.ram_total == 1056164000 * 1024 and m.ram_available == 1003356000 * 1024
    assert m.gpu_free == (81559 << 20, (81559 - 4023) << 20)
    assert node_memory("cpu0", {"mem": "65536000 60000000", "gpumem": ""}).gpu_free is None
    assert node_memory("odd", {"mem": "", "gpumem": "[N/A],[N/A]"}) == NodeMemory("odd")


def test_v4_and_eval_estimates(tiny_ckpt):
    """V4: hidden states of hc_mult streams, eager attention (scores counted); eval streams two models."""
    from engine.checkpoint.reader import CheckpointReader
    from engine.models.detect import detect_layout
    from engine.runs.memory_plan import NodeSlot, model_shape, plan_memory

    r = CheckpointReader(tiny_ckpt("deepseek-v4", "bf16"))
    shape = model_shape(r.config)
    assert shape.hc_mult == 4 and shape.width == 4 * shape.hidden and not shape.sdpa
    assert shape.qk_head == r.config["head_dim"]
    slot = NodeSlot("n0", 2, True)
    plan = plan_memory([("calibrate", True), ("eval", True)], [slot], slot, r.config, r,
                       detect_layout(r.config, r.names()), num_samples=8, seq_len=256, batch_size=2, target="nvfp4")
    cal, ev = plan.needs
    assert cal.sizes["samples_per_rank"] == 4
    assert cal.host_parts["activations"] == 2 * 4 * 256 * shape.width * 2
    scores = 2 * shape.heads * 256 * 256 * 8
    assert cal.gpu_parts["batch_workspace"] >= scores
    assert ev.gpu_parts["layer_params"] == 2 * cal.gpu_parts["layer_params"]
    assert ev.host_parts["activations"] == 2 * cal.host_parts["activations"]
