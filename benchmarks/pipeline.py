#!/usr/bin/env python3
"""Benchmark: the weight-only pipeline's stages, each in a fresh process, beside the I/O floor of its bytes.

Builds (once, cached in --workdir) a DeepSeek-V3 checkpoint, then runs, each in its own process:

  convert   `quantdeck convert --src SRC --dst OUT --to nvfp4` (weight-only NVFP4)
  validate  `quantdeck validate OUT --against SRC`
  run       `quantdeck run recipe.toml` on the same source: the whole weight-only pipeline (inspect, convert,
            inject-mtp, copy-extras, validate) with preflight off, into its own work dir
  run-calibrated  (--calibrate) the same with `calibrate = true`: inspect, calibrate, export (W4A4), inject-mtp,
            copy-extras, validate, eval, on a samples file of random text (--samples N x --seq-len L, batch 8)

Each run's stages are listed with their own walls (from the run directory's status files), so a stage's share of
the run and the time between stages show.

and prints each one's wall, bytes read and written (/proc/<pid>/io of the process tree, polled), peak RSS of the
tree (and peak GPU memory where CUDA exists), and the floor: `cat` of the inputs it reads and `dd` of the outputs
it writes, on the same disk, page cache as for the stage; then validate/convert and run/convert.

Sizes:
  mid-cpu  (default; for 2 cores) V3, 3 layers (layer 0 dense), 64 routed experts of 1536, hidden 2048: 1.2 GB FP8,
           built with `quantdeck fixture` (transformers' own model, random weights)
  real     DeepSeek-V3's widths: hidden 7168, intermediate 18432, 256 routed experts of 2048 + 1 shared, top-8,
           128 heads, q_lora 1536, kv_lora 512, 2 layers (layer 0 dense), written tensor by tensor (no model is
           built: ~13 GB FP8, ~26 GB BF16)
--source fp8 (DeepSeek's FP8 block-128 release format) or bf16.

Page cache: --cold data (default) evicts the benchmark's checkpoints before each stage (posix_fadvise DONTNEED
after a sync), leaving python's and torch's files warm as on an operator's machine; --cold none keeps everything
warm; --cold all drops the whole page cache (root only).

--repeat N runs the stages N rounds in turn (convert, validate, run, then again): one machine's walls vary from
minute to minute (a cold convert took 9.0-13.7 s on machines of one kind), so each ratio to convert is taken within
its round and the medians are printed.

--layers N builds N decoder layers instead (layer 0 dense, the rest MoE): at real width each MoE layer adds ~11.3 GB
of FP8 source, and the fixed costs of a run (process starts, the last shard's way to the disk) weigh less.

Usage:  python benchmarks/pipeline.py [--size mid-cpu|real] [--source fp8|bf16] [--layers N] [--workdir DIR]
                                      [--cold data] [--skip run] [--calibrate [--samples N --seq-len L]] [--repeat N]
                                      [--profile DIR] [--json]
Target: validate <= 1.0x convert; the weight-only run <= 2x convert (mid-cpu), <= 1.3x at real width.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {
    "mid-cpu": dict(layers=3, experts=64, hidden=2048, moe_inter=1536),
    "real": dict(hidden=7168, intermediate=18432, experts=256, moe_inter=2048, shared=1, top_k=8, heads=128,
                 q_lora=1536, kv_lora=512, layers=2, vocab=32000),
}


# -- the sources ----------------------------------------------------------------------------------------------------
def _real_config(s: dict, dtype: str) -> dict:
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": s["vocab"],
           "hidden_size": s["hidden"], "intermediate_size": s["intermediate"], "moe_intermediate_size": s["moe_inter"],
           "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
           "n_shared_experts": s["shared"], "n_routed_experts": s["experts"], "num_experts_per_tok": s["top_k"],
           "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
           "topk_method": "noaux_tc", "norm_topk_prob": True, "first_k_dense_replace": 1, "moe_layer_freq": 1,
           "q_lora_rank": s["q_lora"], "kv_lora_rank": s["kv_lora"], "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
           "v_head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
           "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
           "eos_token_id": 1, "tie_word_embeddings": False, "num_nextn_predict_layers": 0, "dtype": "bfloat16",
           "initializer_range": 0.02, "use_cache": True}
    if dtype == "fp8":
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    return cfg


def _real_tensors(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor: 'gemm' (FP8 in an fp8 source), 'bf16', 'norm', 'f32'."""
    h, qk = s["hidden"], 128 + 64
    out = [("model.embed_tokens.weight", (s["vocab"], h), "bf16"), ("model.norm.weight", (h,), "norm"),
           ("lm_head.weight", (s["vocab"], h), "bf16")]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm"),
                (p + "self_attn.q_a_proj.weight", (s["q_lora"], h), "gemm"),
                (p + "self_attn.q_a_layernorm.weight", (s["q_lora"],), "norm"),
                (p + "self_attn.q_b_proj.weight", (s["heads"] * qk, s["q_lora"]), "gemm"),
                (p + "self_attn.kv_a_proj_with_mqa.weight", (s["kv_lora"] + 64, h), "gemm"),
                (p + "self_attn.kv_a_layernorm.weight", (s["kv_lora"],), "norm"),
                (p + "self_attn.kv_b_proj.weight", (s["heads"] * (128 + 128), s["kv_lora"]), "gemm"),
                (p + "self_attn.o_proj.weight", (h, s["heads"] * 128), "gemm")]
        if i == 0:
            mlps = [(p + "mlp.", s["intermediate"])]
        else:
            out += [(p + "mlp.gate.weight", (s["experts"], h), "bf16"),
                    (p + "mlp.gate.e_score_correction_bias", (s["experts"],), "f32")]
            mlps = [(f"{p}mlp.experts.{e}.", s["moe_inter"]) for e in range(s["experts"])]
            mlps.append((p + "mlp.shared_experts.", s["moe_inter"] * s["shared"]))
        for q, inter in mlps:
            out += [(q + "gate_proj.weight", (inter, h), "gemm"), (q + "up_proj.weight", (inter, h), "gemm"),
                    (q + "down_proj.weight", (h, inter), "gemm")]
    return out


def build_real(path: Path, dtype: str, s: dict) -> Path:
    """A real-width V3 checkpoint written tensor by tensor (random N(0, 0.02) values; FP8 cast per 128×128 tile)."""
    import torch

    from engine.checkpoint import CheckpointWriter, TensorSpec, plan_shards
    from engine.fixtures.tokenizer import build_tokenizer
    from engine.formats.fp8_block.helpers import cast_fp8_block

    tensors = _real_tensors(s)
    units = []
    for name, shape, kind in tensors:
        if kind == "gemm" and dtype == "fp8":
            grid = (-(-shape[0] // 128), -(-shape[1] // 128))
            units.append([TensorSpec(name, "F8_E4M3", shape),
                          TensorSpec(name[: -len("weight")] + "weight_scale_inv", "F32", grid)])
        else:
            units.append([TensorSpec(name, "F32" if kind == "f32" else "BF16", shape)])
    w = CheckpointWriter(path, plan_shards(units, shard_size=int(5e9)), source_fingerprint="bench",
                         args={"size": "real", "dtype": dtype})
    kinds = {n: k for n, _, k in tensors}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random values and the FP8 cast: minutes on a CPU
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"building the real-width V3 {dtype} source at {path} ...", file=sys.stderr)
    for plan in w.prepare():
        sf = w.open_shard(plan)
        for spec in plan.tensors:
            if spec.name.endswith("weight_scale_inv"):
                continue
            kind = kinds[spec.name]
            if kind == "norm":
                sf.write(spec.name, torch.ones(spec.shape, dtype=torch.bfloat16))
            elif kind == "f32":
                sf.write(spec.name, torch.zeros(spec.shape, dtype=torch.float32))
            else:
                t = torch.randn(spec.shape, generator=gen, device=dev) * 0.02
                if kind == "gemm" and dtype == "fp8":
                    q, sc = cast_fp8_block(t)
                    sf.write(spec.name, q.cpu())
                    sf.write(spec.name[: -len("weight")] + "weight_scale_inv", sc.cpu())
                else:
                    sf.write(spec.name, t.to(torch.bfloat16).cpu())
        sf.close()
    w.finalize()
    (path / "manifest.json").unlink()
    (path / "config.json").write_text(json.dumps(_real_config(s, dtype), indent=2))
    build_tokenizer(path)
    return path


def build_source(work: Path, size: str, dtype: str, layers: int | None = None) -> Path:
    s = dict(SIZES[size], layers=layers or SIZES[size]["layers"])
    path = work / f"src-{size}-{dtype}" if layers is None else work / f"src-{size}-L{layers}-{dtype}"
    stamp = path / ".bench_source.json"
    want = {"size": size, "dtype": dtype, "v": 1} | ({"layers": layers} if layers else {})
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    shutil.rmtree(path, ignore_errors=True)
    if size == "real":
        build_real(path, dtype, s)
    else:
        subprocess.run([sys.executable, "-m", "console", "fixture", "--family", "deepseek-v3", "--dtype", dtype,
                        "--out", str(path), "--layers", str(s["layers"]), "--experts", str(s["experts"]),
                        "--hidden", str(s["hidden"]), "--moe-inter", str(s["moe_inter"])], check=True, cwd=REPO)
    stamp.write_text(json.dumps(want))
    return path


# -- measuring ---------------------------------------------------------------------------------------------------------
def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def evict(*roots: Path) -> None:
    subprocess.run(["sync"], check=False)
    for root in roots:
        for p in _files(root):
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass


def drop_all() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def _tree(pid: int):
    import psutil

    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


_IO_FIELDS = ("rchar", "wchar", "read_bytes", "write_bytes")


def _io(path: str = "/proc/self/io") -> list[int]:
    """rchar, wchar, read_bytes, write_bytes of /proc/self/io (the whole process: its threads, and every child it
    has reaped, with theirs) or of one thread's /proc/thread-self/io (that thread alone)."""
    vals = dict(line.split(": ") for line in Path(path).read_text().splitlines())
    return [int(vals[k]) for k in _IO_FIELDS]


def _become_subreaper() -> bool:
    """Orphaned descendants (a detached run driver, its workers) are re-parented to this process instead of init,
    so their I/O reaches this process's counters when they are reaped (Linux: PR_SET_CHILD_SUBREAPER)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_all(timeout_s: float = 120.0) -> None:
    """Wait for every child left (orphans re-parented here included), at most `timeout_s`."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.05)


def run_stage(cmd: list[str], env: dict) -> dict:
    """Run `cmd`: wall, peak RSS of its process tree, and the bytes the whole tree read and wrote. The bytes are
    this process's own counters before and after, once every descendant is reaped (the kernel adds a reaped
    child's counters to its parent's, so summing each process's counters would count a worker once for itself
    and again in the driver that reaped it), less what the RSS sampler itself read from /proc."""
    import psutil

    _become_subreaper()
    before = _io()
    t0, started = time.monotonic(), time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop, sampler = 0, threading.Event(), [0, 0, 0, 0]

    def poll():
        nonlocal peak
        while not stop.is_set():
            rss = 0
            for q in _tree(proc.pid):
                try:
                    rss += q.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, rss)
            time.sleep(0.05)
        sampler[:] = _io("/proc/thread-self/io")

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall, ended = time.monotonic() - t0, time.time()
    stop.set()
    th.join()
    _reap_all()
    tot = [a - b - c for a, b, c in zip(_io(), before, sampler, strict=True)]
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(peak / 1e9, 3), "read_gb": round(tot[0] / 1e9, 3),
            "written_gb": round(tot[1] / 1e9, 3), "disk_read_gb": round(tot[2] / 1e9, 3), "rc": proc.returncode,
            "err_tail": err.strip().splitlines()[-1] if err.strip() else "", "out": out, "span": (started, ended)}


def floor(inputs: list[Path], out_bytes: int, tmp: Path, cold: str) -> dict:
    """`cat` of the inputs (page cache as the stage had it) and `dd` of as many bytes as the stage wrote."""
    files = [str(p) for root in inputs for p in _files(root) if p.suffix == ".safetensors"]
    if cold == "data":
        evict(*inputs)
    elif cold == "all":
        drop_all()
    t0 = time.monotonic()
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)
    read_s = time.monotonic() - t0
    t0 = time.monotonic()
    target = tmp / "dd.out"
    mb = max(1, out_bytes // (1 << 20))
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mb}", "status=none"], check=True)
    write_s = time.monotonic() - t0
    target.unlink()
    return {"cat_s": round(read_s, 2), "dd_s": round(write_s, 2), "floor_s": round(max(read_s, write_s), 2)}


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in _files(root))


def _gpu_poller():
    """Peak GPU memory used (MiB) over the next stage, from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    peak = [0]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                peak[0] = max(peak[0], sum(int(x) for x in out.split() if x.strip().isdigit()))
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    return lambda: (stop.set(), th.join(), peak[0])[2]


def _merge_round(first: dict, res: dict) -> None:
    """A later round's record `res` into the first round's: the peaks the largest seen, any failure kept, the run's
    stage walls listed round by round (the wall itself becomes the median once every round is in)."""
    first["peak_rss_gb"] = max(first["peak_rss_gb"], res["peak_rss_gb"])
    if res["gpu_peak_mib"]:
        first["gpu_peak_mib"] = max(first["gpu_peak_mib"] or 0, res["gpu_peak_mib"])
    first["rc"] = first["rc"] or res["rc"]
    if res.get("stages"):
        first.setdefault("stages_by_round", [first.get("stages", {})]).append(res["stages"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="mid-cpu", choices=sorted(SIZES))
    ap.add_argument("--source", default="fp8", choices=["fp8", "bf16"])
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (layer 0 dense, the rest MoE; default: the size's own, 3 mid-cpu, 2 real)")
    ap.add_argument("--workdir", default=None, help="where the source and outputs go (default: a temp dir, removed)")
    ap.add_argument("--cold", default="data", choices=["data", "none", "all"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip", action="append", default=[], choices=["convert", "validate", "run"])
    ap.add_argument("--calibrate", action="store_true", help="also run the calibrated pipeline (W4A4 + eval)")
    ap.add_argument("--samples", type=int, default=32, help="--calibrate: calibration samples (eval takes 8 more)")
    ap.add_argument("--seq-len", type=int, default=256, help="--calibrate: tokens per sample")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the stages, in turn (convert, validate, run, ... then again): walls as medians, "
                         "each ratio taken within its round; floors measured in the first round")
    ap.add_argument("--profile", metavar="DIR",
                    help="run every stage under `py-spy record --subprocesses --threads` (100 Hz, raw stacks into "
                         "DIR/<stage>-<round>.txt): where the time goes, process by process; the walls then include "
                         "the sampler's cost")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from engine.runs.preflight import bytecode_note

    if (note := bytecode_note()) is not None:  # every stage imports torch: its walls would say more about that
        print(f"note: {note}", file=sys.stderr, flush=True)
    spy = shutil.which("py-spy") if args.profile else None
    if args.profile and spy is None:
        ap.error("--profile needs py-spy on PATH (pip install py-spy)")
    if args.repeat < 1:
        ap.error("--repeat must be 1 or more")
    if args.layers is not None and args.layers < 2:
        ap.error("--layers must be 2 or more (layer 0 is dense, the MoE layers follow)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qd-pipeline-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    src = build_source(work, args.size, args.source, args.layers)
    out, runwork = work / "out", work / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", "import torch, transformers, numpy"], check=False, env=env)  # warm imports
    qd = [sys.executable, "-m", "console"]
    stages = {
        "convert": (lambda: [*qd, "convert", "--src", str(src), "--dst", str(out), "--to", "nvfp4",
                             "--device", args.device], [src], lambda: _size(out)),
        "validate": (lambda: [*qd, "validate", str(out), "--against", str(src)], [src, out], lambda: 0),
        "run": (lambda: [*qd, "run", str(_recipe(work, src, runwork, args.device)), "--no-preflight"], [src],
                lambda: _size(runwork / "outputs")),
    }
    calwork = work / "run-calibrated"
    if args.calibrate:
        samples = _samples(work, args.samples + 8, args.seq_len)
        stages["run-calibrated"] = (lambda: [*qd, "run", str(_recipe(work, src, calwork, args.device, samples=samples,
                                                                     n=args.samples, seq_len=args.seq_len)),
                                             "--no-preflight"], [src], lambda: _size(calwork / "outputs"))
    results: dict[str, dict] = {}
    rounds: dict[str, list[float]] = {}  # each stage's wall, round by round
    writes = {"convert": out, "run": runwork, "run-calibrated": calwork}  # where each command writes
    for rnd in range(args.repeat):
        for name, (make, inputs, written) in stages.items():
            if name in args.skip or (name == "validate" and not out.exists()):
                continue
            if name in writes:  # each round writes afresh
                shutil.rmtree(writes[name], ignore_errors=True)
            if name.startswith("run") and "convert" not in args.skip:  # validated, and written again next round:
                shutil.rmtree(out, ignore_errors=True)  # the disk need not hold two outputs beside the source
            if args.cold == "data":
                evict(src, out)
            elif args.cold == "all":
                drop_all()
            gpu = _gpu_poller()
            print(f"running {name} (round {rnd + 1} of {args.repeat}) ...", file=sys.stderr)
            cmd = make()
            if spy:  # the stage and every process it starts, sampled
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                cmd = [spy, "record", "--subprocesses", "--threads", "--nonblocking", "-r", "100", "--format", "raw",
                       "-o", str(Path(args.profile) / f"{name}-{rnd + 1}.txt"), "--", *cmd]
            res = run_stage(cmd, env)
            res["gpu_peak_mib"] = gpu() if gpu else None
            if rnd == 0:
                res |= floor(inputs, written(), work, args.cold)
            res.pop("out", None)
            span = res.pop("span")
            if name.startswith("run"):
                res["stages"] = _stage_walls(writes[name], span)
            rounds.setdefault(name, []).append(res["wall_s"])
            if rnd == 0:
                results[name] = res
            else:
                _merge_round(results[name], res)
            print(f"{name}: {json.dumps(res)}", file=sys.stderr)  # each stage as it ends, should a later one not
    for name, walls in rounds.items():
        results[name]["walls_s"] = walls
        results[name]["wall_s"] = round(statistics.median(walls), 2)
    conv = rounds.get("convert")
    for name in ("validate", "run", "run-calibrated"):
        if conv and name in rounds:  # within each round: a slow machine moment moves both sides
            ratios = [w / c for w, c in zip(rounds[name], conv, strict=False)]
            results[name]["x_convert"] = round(statistics.median(ratios), 2)
            results[name]["x_convert_by_round"] = [round(x, 2) for x in ratios]
    layers = args.layers or SIZES[args.size]["layers"]
    report = {"size": args.size, "layers": layers, "source": args.source, "source_gb": round(_size(src) / 1e9, 3),
              "cores": os.cpu_count(), "cold": args.cold, "repeat": args.repeat, "stages": results}
    report["projection"] = project(results, report["source_gb"], args.source)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.size} V3, {layers} layers, {args.source} source {report['source_gb']} GB, {os.cpu_count()} cores, "
          f"cold {args.cold}")
    print(f"{'stage':<14} {'wall s':>7} {'x conv':>7} {'read GB':>8} {'written GB':>10} {'peak RSS GB':>11} "
          f"{'GPU MiB':>8} {'cat s':>6} {'dd s':>6} {'rc':>3}")
    for name, r in results.items():
        print(f"{name:<14} {r['wall_s']:>7.2f} {r.get('x_convert', 1.0):>7.2f} {r['read_gb']:>8.3f} "
              f"{r['written_gb']:>10.3f} {r['peak_rss_gb']:>11.3f} {str(r['gpu_peak_mib'] or '-'):>8} "
              f"{r['cat_s']:>6.2f} {r['dd_s']:>6.2f} {r['rc']:>3}" + (f"  {r['err_tail'][:80]}" if r["rc"] else ""))
    if args.repeat > 1:
        print(f"{args.repeat} rounds; wall above: the median; × convert: the median of each round's ratio")
        for name, r in results.items():
            print(f"  {name}: " + " / ".join(f"{w:.2f}" for w in r["walls_s"]) + " s"
                  + (" (× convert " + " / ".join(f"{x:.2f}" for x in r["x_convert_by_round"]) + ")"
                     if r.get("x_convert_by_round") else ""))
    for name, r in results.items():
        for k, walls in enumerate(r.get("stages_by_round") or ([r["stages"]] if r.get("stages") else [])):
            tag = f"{name} (round {k + 1})" if args.repeat > 1 else name
            print(f"{tag}: " + ", ".join(f"{k2} {v:.2f} s" for k2, v in walls.items()))
    pr = report["projection"]
    print(f"projection, linear in source bytes ({pr['assumes']}):")
    for model, rows in pr["models"].items():
        print(f"  {model} ({rows['source_gb']:.0f} GB): " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in rows["stages_s"].items()))
    return 0


# A full model's stored bytes in the benchmark's source format: DeepSeek-V3 (61 layers) as released (FP8 block-128)
# or in BF16; DeepSeek V4-Pro (~1.6 T parameters, 61 layers, ~14 GB stored a layer) in FP8, or ~50 GB a layer in BF16.
FULL_GB = {"DeepSeek-V3": {"fp8": 671, "bf16": 1342}, "DeepSeek-V4-Pro": {"fp8": 61 * 14, "bf16": 61 * 50}}


def project(results: dict, source_gb: float, source: str) -> dict:
    """Each stage's (and run's) wall scaled by the full model's bytes over the benchmark source's: an upper bound
    for a stage's fixed start-up, exact for a stage that streams at a steady rate."""
    models = {}
    for model, sizes in FULL_GB.items():
        scale = sizes[source] / source_gb
        models[model] = {"source_gb": sizes[source],
                         "stages_s": {k: round(r["wall_s"] * scale, 1) for k, r in results.items() if not r["rc"]},
                         "floor_s": {k: round(r["floor_s"] * scale, 1) for k, r in results.items() if not r["rc"]}}
    return {"assumes": "one machine like this one, each stage's wall proportional to the bytes it streams",
            "models": models}


def _recipe(work: Path, src: Path, runwork: Path, device: str, samples: Path | None = None, n: int = 0,
            seq_len: int = 0) -> Path:
    path = work / ("recipe-calibrated.toml" if samples else "recipe.toml")
    text = (f'[run]\nworkdir = "{runwork}"\ndevice = "{device}"\npreflight = false\n\n'
            f'[source]\npath = "{src}"\n\n[target]\nformat = "nvfp4"\ncalibrate = {"true" if samples else "false"}\n'
            'layouts = ["modelopt"]\n')
    if samples:
        text += (f'\n[calibration]\nsamples = "{samples}"\nnum_samples = {n}\nseq_len = {seq_len}\nbatch_size = 8\n'
                 f'\n[eval]\nnum_samples = 8\nseq_len = {seq_len}\nbatch_size = 8\nmax_kld_mean = 100\nmin_top1 = 0\n')
    path.write_text(text)
    return path


def _samples(work: Path, n: int, seq_len: int) -> Path:
    """n samples of random text, one byte a token for the fixtures' byte-level tokenizer (random weights: the
    eval gate is set wide open, the figures mean nothing)."""
    from _samples import write_random_text  # benchmarks/ is the script's folder, first on sys.path

    return write_random_text(work / f"samples-{n}x{seq_len}.json", n, seq_len)


def _stage_walls(runwork: Path, span: tuple[float, float]) -> dict[str, float]:
    """Each stage's wall in the run under `runwork` (started_at → ended_at of its status.json), in run order,
    `between`: the run's stage-free time from the first start to the last end, `before`: from the command's start
    (`span`: its start and end, epoch seconds) to the first stage's, `to-driver`: the part of `before` until the
    driver began driving (the CLI's and the driver's start-up; the rest is the first worker's), `after`: from the
    last stage's end to the command's, and `sync-wait`: how long the run waited after its last stage for the
    stages' writes to reach the disk (engine.runs.durability), part of `after`."""
    from engine.core.fsutil import read_json
    from engine.runs.rundir import RunDir

    runs = sorted((runwork / "runs").glob("*/stages"))
    if not runs:
        return {}
    run = RunDir(runs[-1].parent)
    spans = []
    for st in runs[-1].glob("*/status.json"):
        d = json.loads(st.read_text())
        if d.get("started_at") and d.get("ended_at"):
            spans.append((d["started_at"], d["ended_at"], st.parent.name))
    spans.sort()
    out = {name: round(b - a, 3) for a, b, name in spans}
    if spans:
        out["between"] = round(spans[-1][1] - spans[0][0] - sum(b - a for a, b, _ in spans), 3)
        out["before"] = round(spans[0][0] - span[0], 3)
        driving = (read_json(run.driver_path) or {}).get("started_at")
        if isinstance(driving, (int, float)) and span[0] <= driving <= spans[0][0]:
            out["to-driver"] = round(driving - span[0], 3)
        out["after"] = round(span[1] - spans[-1][1], 3)
    waited = run.read_meta().get("sync_wait_s")
    if waited is not None:
        out["sync-wait"] = waited
    return out


if __name__ == "__main__":
    sys.exit(main())
