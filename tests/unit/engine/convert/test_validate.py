"""validate_checkpoint finds what is wrong and names the tensor; inject-mtp and copy-extras."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointReader, write_checkpoint
from engine.convert import convert_checkpoint, copy_extras
from engine.convert.mtp import inject_mtp
from engine.convert.validate import format_report, validate_checkpoint

REPO = Path(__file__).resolve().parents[4]


@pytest.fixture(scope="module")
def converted(tiny_nvfp4):
    return tiny_nvfp4("bf16")


def _rewrite(src_dir, dst, edit):
    """A copy of checkpoint `src_dir` with tensors edited by `edit(dict)` (config and extras kept)."""
    r = CheckpointReader(src_dir)
    tensors = {n: r.get(n).clone() for n in r.names()}
    edit(tensors)
    write_checkpoint(dst, tensors)
    (dst / "manifest.json").unlink()
    for f in ("config.json", "hf_quant_config.json"):
        (dst / f).write_text((src_dir / f).read_text())
    return dst


def test_clean_output_passes_with_a_table(converted):
    src, out = converted
    rep = validate_checkpoint(out)
    assert rep["ok"] and {c["check"] for c in rep["checks"]} >= {"index", "layout", "scales", "decode"}
    assert "OK" in format_report(rep)


def _fails(rep, check, tensor):
    assert not rep["ok"]
    hits = [f for f in rep["failures"] if f["check"] == check and tensor in (f["at"] or "")]
    assert hits, rep["failures"]
    return hits[0]


def test_zero_block_scale_and_split_fused_scale_are_named(converted, tmp_path):
    src, out = converted
    gate = "model.layers.1.mlp.experts.0.gate_proj"

    def edit(t):
        t[gate + ".weight_scale"][0, 0] = 0.0
        t[gate + ".weight_scale_2"] = t[gate + ".weight_scale_2"] * 2

    rep = validate_checkpoint(_rewrite(out, tmp_path / "bad", edit))
    _fails(rep, "scales", gate + ".weight_scale")
    assert any("fused group" in f["msg"] for f in rep["failures"])


def test_nan_in_kept_tensor_and_source_mismatch(converted, tmp_path):
    src, out = converted

    def edit(t):
        t["model.norm.weight"][3] = float("nan")
        t["model.layers.0.self_attn.o_proj.weight"][0, 0] += 1

    rep = validate_checkpoint(_rewrite(out, tmp_path / "bad", edit), against=src)
    _fails(rep, "decode", "model.norm.weight")
    _fails(rep, "source", "model.layers.0.self_attn.o_proj.weight")


def test_large_kept_tensors_are_compared_on_the_sampled_rows(converted, tmp_path, monkeypatch):
    from engine.convert import validate_source

    src, out = converted
    monkeypatch.setattr(validate_source, "KEPT_WHOLE_BYTES", 0)  # every 2-D kept tensor counts as large
    rep = validate_checkpoint(out, against=src)
    row = next(c for c in rep["checks"] if c["check"] == "source")
    assert rep["ok"] and "large ones on sampled rows" in row["detail"], row

    def edit(t):
        t["model.embed_tokens.weight"][0, 5] += 1  # row 0: always sampled

    rep = validate_checkpoint(_rewrite(out, tmp_path / "bad", edit), against=src)
    assert "differs from the source" in _fails(rep, "source", "model.embed_tokens.weight")["msg"]


def test_wrong_ignore_list_and_broken_index(converted, tmp_path):
    src, out = converted
    bad = _rewrite(out, tmp_path / "bad", lambda t: None)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["ignore"].remove("lm_head")
    (bad / "config.json").write_text(json.dumps(cfg))
    _fails(validate_checkpoint(bad), "layout", "lm_head")
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = next(iter(idx["weight_map"].values()))
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    _fails(validate_checkpoint(bad), "index", "ghost.weight")


def test_block_check_catches_a_wrong_layer(converted, tmp_path):
    src, out = converted
    down = "model.layers.0.mlp.down_proj"

    def edit(t):  # swap packed rows: every scale stays valid, only the layer's math changes
        t[down + ".weight"] = t[down + ".weight"].flip(0).contiguous()
        t[down + ".weight_scale"] = t[down + ".weight_scale"].flip(0).contiguous()

    rep = validate_checkpoint(_rewrite(out, tmp_path / "bad", edit), against=src)
    _fails(rep, "block", "model.layers.0")


@pytest.mark.parametrize("hidden", [64, 256])  # smaller and larger than the output's 128
def test_against_a_different_model_names_the_tensor_whose_shape_differs(converted, tiny_ckpt, hidden):
    src, out = converted
    other = tiny_ckpt("deepseek-v3", "bf16", hidden=hidden)
    rep = validate_checkpoint(out, against=other)
    hit = _fails(rep, "source", "model.layers.0.self_attn.o_proj")
    assert "differs from the source's" in hit["msg"] and "--against" in hit["msg"]
    _fails(rep, "source", "lm_head.weight")
    assert {c["check"]: c["status"] for c in rep["checks"]}["block"] == "skipped"
    assert validate_checkpoint(out, against=src)["ok"]  # NVFP4's padded columns are no mismatch


def test_inject_mtp_copies_shared_embedding_and_head(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v3", "bf16", mtp=True)
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    stripped = tmp_path / "stripped"
    drop = {f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"}
    r = CheckpointReader(src)
    write_checkpoint(stripped, {k: r.get(k) for k in r.names() if k not in drop})
    copy_extras(src, stripped)
    res = inject_mtp(stripped, tmp_path / "final")
    assert sorted(res["injected"]) == sorted(drop)
    out = CheckpointReader(tmp_path / "final")
    assert torch.equal(out.get(f"model.layers.{n}.embed_tokens.weight"), r.get("model.embed_tokens.weight"))
    assert torch.equal(out.get(f"model.layers.{n}.shared_head.head.weight"), r.get("lm_head.weight"))
    assert (tmp_path / "final" / "tokenizer.json").exists()
    again = inject_mtp(tmp_path / "final", tmp_path / "final2")
    assert again["injected"] == []


def test_inject_mtp_refuses_a_dst_inside_its_source(tiny_ckpt, tmp_path):
    from engine.core.errors import UsageError
    from tests.fixtures_ckpt import copy_ckpt

    src = copy_ckpt(tiny_ckpt("deepseek-v3", "bf16", mtp=True), tmp_path, "src")
    with pytest.raises(UsageError, match="inside the source directory") as ei:
        inject_mtp(src, src / "final")
    assert ei.value.at == "DST" and not list(src.glob("final*"))


def test_inject_mtp_v4_from_original(tiny_ckpt, tmp_path):
    src = tiny_ckpt("deepseek-v4", "fp8", mtp=True)
    r = CheckpointReader(src)
    no_mtp = tmp_path / "nomtp"
    write_checkpoint(no_mtp, {k: r.get(k) for k in r.names() if not k.startswith(("mtp.", "model.mtp."))})
    copy_extras(src, no_mtp)
    res = inject_mtp(no_mtp, tmp_path / "final", mtp_from=src)
    out = CheckpointReader(tmp_path / "final")
    mtp = [n for n in out.names() if n.startswith(("mtp.", "model.mtp."))]
    assert mtp and set(res["injected"]) == set(mtp)
    assert all(out.meta(n).dtype_name not in ("F8_E4M3", "U8", "I8") for n in mtp)  # kept BF16


def test_inject_mtp_v4_in_transformers_names_copies_into_the_top_level_mtp_layer(tiny_ckpt, tmp_path):
    """transformers' V4 names keep the MTP layer at the top (`mtp.0.`) beside `model.layers.`, the embedding
    as `model.embed_tokens.weight` and the head as `head.weight`: the copies go into `mtp.0.`."""
    src = tiny_ckpt("deepseek-v4", "fp8", mtp=True, v4_names="transformers")
    r = CheckpointReader(src)
    assert any(n.startswith("mtp.0.") for n in r.names()) and "mtp.0.head.weight" not in r
    res = inject_mtp(src, tmp_path / "final")
    assert sorted(res["injected"]) == ["mtp.0.embed.weight", "mtp.0.head.weight"]
    out = CheckpointReader(tmp_path / "final")
    assert torch.equal(out.get("mtp.0.embed.weight"), r.get("model.embed_tokens.weight"))
    assert torch.equal(out.get("mtp.0.head.weight"), r.get("head.weight"))


def test_labels_that_disagree_with_the_tensors_fail_the_config_check(tiny_ckpt, tmp_path):
    """A loader trusts the label: an edited quant_algo, a missing hf_quant_config.json, a compressed-tensors
    format or a quantization_config on an unquantized output each fail, naming the file."""
    import shutil

    src = tiny_ckpt("deepseek-v3", "fp8")
    convert_checkpoint(src, tmp_path / "o", to="nvfp4", layouts=["modelopt", "compressed-tensors"])
    convert_checkpoint(src, tmp_path / "b", to="bf16")

    def failures(d):
        rep = validate_checkpoint(d)
        return [f for f in rep["failures"] if f["check"] == "config"]

    def edit(path, fn):
        obj = json.loads(path.read_text())
        fn(obj)
        path.write_text(json.dumps(obj))

    for d in ("o/modelopt", "o/compressed-tensors", "b"):
        assert not failures(tmp_path / d), d
    cases = {"algo": ("modelopt", lambda d: edit(d / "config.json", lambda c: c["quantization_config"].update(
                 quant_algo="FP8")), "quant_algo 'FP8'"),
             "hfq": ("modelopt", lambda d: (d / "hf_quant_config.json").unlink(), "hf_quant_config.json is missing"),
             "ct": ("compressed-tensors", lambda d: edit(d / "config.json", lambda c: c["quantization_config"].update(
                 format="float-quantized")), "'float-quantized'"),
             "bf": (None, lambda d: edit(d / "config.json", lambda c: c.update(quantization_config={
                 "quant_method": "fp8"})), "no tensor is quantized")}
    for name, (lay, break_it, words) in cases.items():
        d = tmp_path / name
        shutil.copytree(tmp_path / "o" / lay if lay else tmp_path / "b", d)
        break_it(d)
        got = failures(d)
        assert len(got) == 1 and words in got[0]["msg"], (name, got)


def test_a_config_the_reference_layer_cannot_run_skips_the_block_check_instead_of_blaming_the_output(tiny_ckpt,
                                                                                                     tmp_path):
    """A config transformers' layer cannot run for the source itself (an exploratory run's one-expert model:
    top-k out of range; here layer 0 made a routed layer with more experts per token than experts): the check is
    skipped with the reason, not failed as if the converted checkpoint were broken."""
    from tests.fixtures_ckpt import copy_ckpt

    src = copy_ckpt(tiny_ckpt("deepseek-v3", "bf16", experts=2), tmp_path, "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_experts_per_tok"], cfg["first_k_dense_replace"] = cfg["n_routed_experts"] + 2, 0  # layer 0 routes
    (src / "config.json").write_text(json.dumps(cfg))
    convert_checkpoint(src, tmp_path / "o", to="bf16")
    rep = validate_checkpoint(tmp_path / "o", against=src)
    block = next(c for c in rep["checks"] if c["check"] == "block")
    assert rep["ok"] and block["status"] == "skipped" and "cannot run layer 0 of the source" in block["detail"], rep


def test_the_nvfp4_block_ceiling_grows_with_the_matrices_quantized_in_series():
    from engine.convert.validate_ref import BLOCK_TOL, block_tol

    def names(*mods):
        return [f"model.layers.0.{m}.{t}" for m in mods for t in ("weight", "weight_scale", "weight_scale_2")]

    mlp = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    attn = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
            "self_attn.o_proj")
    assert block_tol("nvfp4", names(*mlp)) == BLOCK_TOL["nvfp4"]  # weight-only's three
    w4a4 = block_tol("nvfp4", names(*mlp, *attn))
    assert w4a4 == round(BLOCK_TOL["nvfp4"] * (8 / 3) ** 0.5, 3) and 0.215 < w4a4 < 0.4
    experts = [f"mlp.experts.{e}.{p}" for e in range(64) for p in ("gate_proj", "up_proj", "down_proj")]
    assert block_tol("nvfp4", names(*experts)) == BLOCK_TOL["nvfp4"]  # side by side: one expert's three
    assert block_tol("fp8-block", names(*mlp, *attn)) == BLOCK_TOL["fp8-block"]


@pytest.mark.parametrize("kernels", ["c", "numba"])
@pytest.mark.parametrize("rows_total, width", [(2048, 8192), (96, 8192), (4096, 300)])
def test_sampled_rows_read_alone_or_in_one_read_are_the_same_bytes(tmp_path, monkeypatch, rows_total, width, kernels):
    """HostReader.rows: a large tensor's sampled rows read one by one (readahead off; in one C call where the C
    kernels build, QUANTDECK_KERNELS=numba reads them in Python), a small or narrow one's read whole and picked:
    every way exactly the rows' bytes."""
    from engine.convert import validate_read as host

    monkeypatch.setenv("QUANTDECK_KERNELS", kernels)
    assert (host._native() is not None) == (kernels == "c")  # the C path is the one taken, where asked for
    data = torch.randint(0, 256, (rows_total, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    write_checkpoint(tmp_path / "c", {"pad": torch.zeros(5, dtype=torch.uint8), "w": data})
    files = host.Files()
    try:
        reader = host.HostReader(CheckpointReader(tmp_path / "c"), files)
        rows = host.sample_rows(rows_total)
        got = reader.rows("w", rows, slot="t")
        assert got.tobytes() == data.numpy()[rows].tobytes()
        alone = 2 * len(rows) * (width // host.PAGE + 2) * host.PAGE <= rows_total * width
        assert bool(files._random) == alone  # the large one took the row-by-row path
    finally:
        files.close()


def test_relative_paths_reach_the_block_check(converted):
    """`quantdeck validate out --against model` run where both are: the layer-0 check's child process (which runs
    from the repository) gets the paths as the user meant them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src, out = converted
    root = Path(__file__).resolve().parents[4]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "console", "validate", out.name, "--against",
                          os.path.relpath(src, out.parent), "--json"], cwd=out.parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rep = json.loads(res.stdout)
    assert rep["ok"] and any(c["check"] == "block" for c in rep["checks"])


@pytest.mark.parametrize("kernels", ["c", "numba"])
def test_sampled_rows_of_a_truncated_shard_are_refused_by_name(tmp_path, monkeypatch, kernels):
    """A shard cut short inside a sampled row: the host path gives the tensor up by name (Unsupported: the torch
    reference then reports the damage), in C and in Python alike."""
    import os

    from engine.convert import validate_read as host

    monkeypatch.setenv("QUANTDECK_KERNELS", kernels)
    assert (host._native() is not None) == (kernels == "c")
    write_checkpoint(tmp_path / "c", {"w": torch.ones(2048, 8192, dtype=torch.uint8)})
    reader = CheckpointReader(tmp_path / "c")
    m = reader.meta("w")
    shard = tmp_path / "c" / m.shard
    rows = host.sample_rows(2048)
    assert 1999 in rows.tolist() and 1998 not in rows.tolist()
    os.truncate(shard, m.start + 1999 * 8192 + 100)  # sampled row 1999 is cut, the rows after it gone
    files = host.Files()
    try:
        with pytest.raises(host.Unsupported, match="w: the file ended early"):
            host.HostReader(reader, files).rows("w", rows, slot="t")
    finally:
        files.close()


def test_a_failed_read_of_sampled_rows_names_the_tensor_and_the_shard(tmp_path, monkeypatch):
    """Where the C call's read fails (a descriptor pread refuses: ESPIPE), the OSError names the tensor and its
    shard file, and carries the errno."""
    import errno
    import os

    from engine.convert import validate_read as host

    monkeypatch.setenv("QUANTDECK_KERNELS", "c")
    write_checkpoint(tmp_path / "c", {"w": torch.ones(2048, 8192, dtype=torch.uint8)})
    reader = CheckpointReader(tmp_path / "c")
    r, w = os.pipe()
    files = host.Files()
    monkeypatch.setattr(files, "fd", lambda path: r)
    try:
        with pytest.raises(OSError, match="reading w: ") as e:
            host.HostReader(reader, files).rows("w", host.sample_rows(2048), slot="t")
        assert e.value.errno == errno.ESPIPE and e.value.filename == str(tmp_path / "c" / reader.meta("w").shard)
    finally:
        os.close(r)
        os.close(w)


def test_sampled_rows_asked_for_ahead_tolerate_a_file_that_cannot_be_advised():
    """Files.will_need queues the rows' reads ahead (POSIX_FADV_WILLNEED); where the kernel refuses the advice (a
    pipe here: ESPIPE) the rows are read one by one all the same, so nothing is raised."""
    import os

    from engine.convert import validate_read as host

    r, w = os.pipe()
    try:
        host.Files.will_need(r, [0, 4096], 4096)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_gpu)])
def test_decode_module_on_a_device_gives_the_host_values(converted, device):
    """The decoder-block check decodes layer 0 where it runs: the same float32 values as on the host, bit for bit,
    for the NVFP4 modules and the BF16 ones."""
    from engine.convert.validate_ref import decode_module

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, out = converted
    r = CheckpointReader(out)
    bases = sorted({n.rsplit(".", 1)[0] for n in r.names() if n.startswith("model.layers.0.")
                    and n.endswith((".weight", ".weight_packed"))})
    assert any(b + ".weight_scale_2" in r or b + ".weight_global_scale" in r for b in bases)
    for base in bases:
        host = decode_module(r, base)
        there = decode_module(r, base, device=device)
        assert there.device.type == device and there.dtype == torch.float32, base
        assert torch.equal(there.cpu(), host), base


def test_fused_experts_are_stacked_on_the_device_expert_by_expert(tmp_path):
    """block_check._stack_experts: transformers' [experts, gate ‖ up rows, cols] parameter, filled in place from each
    expert's decoded matrices, the same values as concatenating and stacking them; a missing or misshapen expert
    matrix is named."""
    from engine.convert.block_check import _stack_experts

    g = torch.Generator().manual_seed(2)
    mats = {f"m.{e}.{p}.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16)
            for e in range(2) for p in ("gate_proj", "up_proj")}
    write_checkpoint(tmp_path / "c", mats)
    r = CheckpointReader(tmp_path / "c")
    ref = torch.empty(2, 6, 5, device="meta")
    got = _stack_experts(r, ref, torch.device("cpu"), ["m.{e}.gate_proj", "m.{e}.up_proj"])
    want = torch.stack([torch.cat([mats[f"m.{e}.gate_proj.weight"], mats[f"m.{e}.up_proj.weight"]]).float()
                        for e in range(2)])
    assert torch.equal(got, want)
    with pytest.raises(KeyError, match=r"m\.0\.down_proj: no such module"):
        _stack_experts(r, ref, torch.device("cpu"), ["m.{e}.gate_proj", "m.{e}.down_proj"])
    with pytest.raises(KeyError, match="expected 8 rows for expert 0, found 6"):
        _stack_experts(r, torch.empty(2, 8, 5, device="meta"), torch.device("cpu"),
                       ["m.{e}.gate_proj", "m.{e}.up_proj"])


def test_the_block_check_runs_a_v4_layer_0_with_its_routed_experts(tiny_ckpt, tmp_path):
    """V4's layer 0 is a MoE layer: its fused experts are decoded expert by expert into transformers' parameters."""
    src = tiny_ckpt("deepseek-v4", "fp8")
    convert_checkpoint(src, tmp_path / "out", to="nvfp4")
    rep = validate_checkpoint(tmp_path / "out", src)
    block = next(c for c in rep["checks"] if c["check"] == "block")
    assert rep["ok"] and block["status"] == "ok" and "DeepseekV4DecoderLayer" in block["detail"], block


def _both_paths(monkeypatch, fn, kernel: str):
    """fn() with validate's C decoders, then with its numpy ones: (C result, numpy result); the C kernel `kernel`
    (a function of engine.formats.native.calls) must have been called by the first, and not by the second."""
    from engine.convert import validate_read as host
    from engine.formats.native import calls

    monkeypatch.delenv("QUANTDECK_KERNELS", raising=False)
    assert host._native() is not None
    real, n = getattr(calls, kernel), [0]

    def counted(*a, **kw):
        n[0] += 1
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(calls, kernel, counted)
        c = fn()
        assert n[0] >= 1  # the C path was the one taken
        m.setattr(host, "_native", lambda: None)
        ref = fn()
        assert n[0] == 1
    return c, ref


@pytest.mark.parametrize("o, cols, block, rows", [(300, 300, (128, 128), "sampled"), (300, 256, (128, 128), "all"),
                                                   (7, 100, (128, 128), "all"), (64, 96, (1, 32), "sampled")])
def test_fp8_rows_decode_in_c_to_the_numpy_bytes(monkeypatch, o, cols, block, rows):
    """fp8_values in C: bit for bit numpy's float32 products, NaN codes, zero and infinite tile scales, a partial
    last tile and rows spread over tiles included (NaN scales aside: which NaN a NaN code times a NaN scale gives
    is not fixed, in numpy either)."""
    from engine.convert import validate_read as host

    g = np.random.default_rng(o + cols)
    idx = np.array([0, 1, 129, 130, o - 1], np.int64) if rows == "sampled" and o > 130 else \
        np.arange(0, o, 3, dtype=np.int64) if rows == "sampled" else np.arange(o, dtype=np.int64)
    codes = g.integers(0, 256, (len(idx), cols), dtype=np.uint8)
    codes[0, :4] = (0x7F, 0xFF, 0x00, 0x80)
    grid = (-(-o // block[0]), -(-cols // block[1]))
    sc = g.uniform(1e-4, 3.0, grid).astype(np.float32)
    sc[0, 0], sc[-1, -1] = 0.0, np.inf
    c, ref = _both_paths(monkeypatch, lambda: host.fp8_values(codes, idx, sc, block, cols).copy(), "fp8_rows_f32")
    assert c.shape == ref.shape == (len(idx), cols) and c.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()


@pytest.mark.parametrize("rows", [None, [0, 2, 5, 6]])
@pytest.mark.parametrize("cols", [48, 40])
def test_nvfp4_rows_decode_in_c_to_the_numpy_bytes(monkeypatch, rows, cols):
    """nvfp4_values in C: bit for bit numpy's values (the block scale times scale_2, then times each E2M1 value),
    with NaN, zero and negative block-scale bytes, sampled rows read where they lie, and the padding cut off."""
    from engine.convert import validate_read as host

    g = np.random.default_rng(11)
    packed = g.integers(0, 256, (7, 24), dtype=np.uint8)
    bs = g.integers(0, 256, (7, 3), dtype=np.uint8)
    bs[0] = (0x7F, 0x80, 0x00)
    idx = None if rows is None else np.array(rows, np.int64)
    for s2 in (np.float32(0.37), np.float32(1e-30), np.float32(3e38)):
        c, ref = _both_paths(monkeypatch, lambda s2=s2: np.ascontiguousarray(
            host.nvfp4_values(packed, bs, s2, cols, rows=idx)), "nvfp4_rows_f32")
        assert c.shape == ref.shape == (7 if rows is None else len(rows), cols)
        assert c.view(np.uint32).tobytes() == ref.view(np.uint32).tobytes()


def test_block_scale_scan_in_c_counts_as_numpy_does(monkeypatch):
    """scan_e4m3 in C: the NaN bytes, the bytes that are no finite scale > 0 (NaN, zero, negative; 0x80 and 0xFF
    counted once) and the largest magnitude, as numpy's five passes give them; an empty array has none."""
    from engine.convert import validate_read as host

    every = np.arange(256, dtype=np.uint8)
    some = np.random.default_rng(2).integers(1, 0x7F, (33, 17), dtype=np.uint8)
    for bs in (every, some, np.zeros(0, np.uint8), np.array([0x80, 0xFF, 0x7F, 0x00, 0x01], np.uint8)):
        c, ref = _both_paths(monkeypatch, lambda bs=bs: host.scan_e4m3(bs), "e4m3_scan")
        assert c == ref
    assert host.scan_e4m3(every) == (2, 1 + 1 + 128, 0x7F)  # NaN: 0x7F, 0xFF; bad: 0x7F, 0x00, 0x80..0xFF


def test_validate_decoders_in_c_refuse_arrays_they_cannot_take():
    """The C decoders' calls check what they are given, one defect at a time (ValueError), so no kernel reads or
    writes out of bounds: not even a block size that ctypes would wrap into a small or negative int64."""
    from engine.convert import validate_read as host
    from engine.formats.native import calls

    lib = host._native()
    codes, idx = np.zeros((4, 300), np.uint8), np.arange(4, dtype=np.int64)
    sc, out = np.ones((1, 3), np.float32), np.zeros((4, 300), np.float32)
    read_only = out.copy()
    read_only.flags.writeable = False
    fp8 = dict(codes=codes, rows=idx, sc=sc, bo=128, bi=128, lut=host.E4M3_LUT, out=out)
    calls.fp8_rows_f32(lib, *fp8.values())  # as given: taken
    for bad in (dict(codes=codes[:, ::2]), dict(codes=codes.view(np.int8)), dict(rows=idx.astype(np.int32)),
                dict(rows=idx + 200), dict(rows=idx - 1), dict(rows=idx[:3]), dict(sc=np.ones((1, 2), np.float32)),
                dict(sc=sc.astype(np.float64)), dict(bo=0), dict(bi=0), dict(bo=2**64 + 1), dict(bi=2**63),
                dict(bo=1.5), dict(lut=host.E4M3_LUT[:255].copy()), dict(out=out[:3]), dict(out=read_only),
                dict(out=np.zeros((4, 301), np.float32)[:, :300])):
        with pytest.raises(ValueError, match="fp8_rows_f32"):
            calls.fp8_rows_f32(lib, *(fp8 | bad).values())
    packed, bs, out4 = np.zeros((4, 24), np.uint8), np.zeros((4, 3), np.uint8), np.zeros((4, 48), np.float32)
    nv = dict(packed=packed, bs=bs, s2=1.0, rows=None, lut=host.E4M3_LUT, pair=host.PAIR_LUT, out=out4)
    calls.nvfp4_rows_f32(lib, *nv.values())
    u8, f32 = np.uint8, np.float32
    for bad in (dict(packed=np.zeros((4, 20), u8), bs=np.zeros((4, 2), u8), out=np.zeros((4, 40), f32)),  # p % 8
                dict(bs=np.zeros((4, 2), u8)), dict(bs=np.zeros((3, 3), u8)), dict(rows=np.array([4], np.int64)),
                dict(rows=np.array([-1], np.int64), out=out4[:1]), dict(out=np.zeros((4, 40), np.float32)),
                dict(out=np.zeros((3, 48), np.float32)), dict(pair=host.PAIR_LUT.T.copy()),
                dict(lut=host.E4M3_LUT.astype(np.float64))):
        with pytest.raises(ValueError, match="nvfp4_rows_f32"):
            calls.nvfp4_rows_f32(lib, *(nv | bad).values())
    for bad_bs in (np.zeros((4, 4), np.uint8)[:, ::2], np.zeros(4, np.int8)):
        with pytest.raises(ValueError, match="e4m3_scan"):
            calls.e4m3_scan(lib, bad_bs)
    for bad_bits in (np.zeros(8, np.uint16)[::2], np.zeros(8, np.int16), np.zeros(9, np.uint8)[1:].view(np.uint16)):
        with pytest.raises(ValueError, match="bf16_finite"):
            calls.bf16_finite(lib, bad_bits)


def test_bf16_finiteness_in_c_as_numpy_judges_it(monkeypatch):
    """all_finite on BF16 in C: false exactly where numpy finds a NaN or Inf (either sign, any payload), wherever
    it lies in the tensor (first value, inside a later 4096-value block, last value); an empty tensor is finite."""
    from engine.convert import validate_read as host

    base = np.random.default_rng(4).integers(0, 2**16, 10_001, dtype=np.uint16)
    base[(base & 0x7F80) == 0x7F80] = 0x3F80  # every value finite to begin with
    cases = [base, base[:0]]
    for at, bits in ((0, 0x7F80), (5_000, 0xFF80), (10_000, 0x7FC1), (4_096, 0xFFFF)):
        bad = base.copy()
        bad[at] = bits
        cases.append(bad)
    for x in cases:
        c, ref = _both_paths(monkeypatch, lambda x=x: host.all_finite(x.view(np.uint8), "BF16"), "bf16_finite")
        assert c == ref == (x is base or x.size == 0)


def test_bf16_values_are_the_high_half_of_float32():
    """float32_values of BF16 bytes: each value's bits moved to the high half of a float32, as torch's .float()."""
    from engine.convert import validate_read as host

    bits = np.arange(2**16, dtype=np.uint16)
    got = host.float32_values(bits.view(np.uint8), "BF16", (2**16,))
    want = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert got.dtype == np.float32 and got.view(np.uint32).tobytes() == want.view(np.uint32).tobytes()


_NICE_PROBE = """
import json, os, sys, threading
from engine.convert import validate_pass
from engine.convert.validate import validate_checkpoint
seen = set()
do = validate_pass.Pass.do
def spy(self, *a, **k):
    seen.add(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    return do(self, *a, **k)
validate_pass.Pass.do = spy
if sys.argv[3] == "in-process":  # transformers imported here: the decoder-block check runs in this process, later
    import transformers.modeling_utils
rep = validate_checkpoint(sys.argv[1], against=sys.argv[2])
print(json.dumps({"ok": rep["ok"], "nice": sorted(seen), "base": os.getpriority(os.PRIO_PROCESS, 0)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice is Linux's")
@pytest.mark.parametrize("where, env, added", [("child", None, 10), ("child", "4", 4), ("child", "0", 0),
                                               ("in-process", None, 0)])
def test_the_pass_gives_way_to_a_decoder_block_child_beside_it(converted, where, env, added):
    """validate's pass threads run at QUANTDECK_VALIDATE_NICE (default 10) above the process's nice while the
    decoder-block check runs in a child beside them; where the check runs in this process afterwards, at its own."""
    src, out = converted
    e = {k: v for k, v in os.environ.items() if k != "QUANTDECK_VALIDATE_NICE"}
    if env is not None:
        e["QUANTDECK_VALIDATE_NICE"] = env
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _NICE_PROBE, str(out), str(src), where], capture_output=True,
                         text=True, env=e, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ok"] and got["nice"] == [min(19, got["base"] + added)], got
