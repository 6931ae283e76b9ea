"""Benchmark: quantdeck's layer-streaming calibration vs modelopt's whole-model flow, in one run.

    python benchmarks/calibrate.py --device cuda --size mid [--samples 128 --seq-len 512 --batch-size 8]
                                   [--ranks 2] [--gpu-mem-fraction 0.25] [--work DIR]

Builds (once, cached in --work) a synthetic DeepSeek V3 checkpoint in BF16 with transformers (random
weights, real byte-level tokenizer) and a samples file of random text (one byte = one token). Then, each in
its own fresh process: quantdeck's `calibrate` (one process, or --ranks N under torchrun), and modelopt's flow
(`from_pretrained` onto the GPU, then `mtq.quantize(model, NVFP4_DEFAULT_CFG, loop)` over the same batches).
Prints wall times (load included for modelopt), peak GPU memory, peak RSS, their ratios, and whether every
amax agrees. --gpu-mem-fraction caps both with torch.cuda.set_per_process_memory_fraction (modelopt then
loads with device_map="auto" and a max_memory that offloads the rest to CPU).

Before timing, the built model is synced to disk and one untimed process imports torch, transformers and
modelopt (--no-warmup skips it): on a fresh machine the first import compiles bytecode and reads cold files,
which would otherwise land on whichever tool runs first. The report has each tool's phases (streaming:
summary["phases"] of calibrate() and per-layer times; modelopt: import, from_pretrained, forward loop, quantize).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

T_PROCESS = time.monotonic()  # (this module's import: after the interpreter started)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit" / "engine" / "calibrate"))

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                 n_routed_experts=16, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, vocab_size=1024),
    "mid": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=704, num_hidden_layers=8,
                n_routed_experts=64, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=256, vocab_size=32000),
}


WARMUP = ("import torch, safetensors.torch, transformers, modelopt.torch.quantization, engine.calibrate.streaming; "
          "from transformers.models.deepseek_v3 import modeling_deepseek_v3; "
          "from transformers import AutoModelForCausalLM, AutoTokenizer")


def build(work: Path, size: str, n: int, seq_len: int, device: str) -> tuple[Path, Path]:
    model_dir, samples = work / f"v3-{size}", work / f"samples-{n}x{seq_len}.json"
    if not (model_dir / "config.json").exists():
        import torch
        from calib_tiny_models import save_tokenizer, v3_config
        from transformers import DeepseekV3ForCausalLM

        cfg = v3_config(**SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"], n_group=8,
                        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=1, qk_rope_head_dim=64,
                        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=4096)
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in BF16: half the memory of fp32-then-cast
        try:
            with torch.device(device if device != "auto" else "cpu"):
                model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
        finally:
            torch.set_default_dtype(prev)
        model.save_pretrained(str(model_dir), max_shard_size="2GB")
        save_tokenizer(model_dir)
        del model
    if not samples.exists():
        rng = random.Random(0)
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-"
        samples.write_text(json.dumps(["".join(rng.choice(alphabet) for _ in range(seq_len)) for _ in range(n)]))
    return model_dir, samples


def _peaks(device: str) -> dict:
    import torch

    out = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device == "cuda" and torch.cuda.is_available():
        out["peak_gpu_gb"] = torch.cuda.max_memory_reserved() / 2**30
        out["peak_gpu_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _cap(frac: float | None) -> None:
    if frac:
        import torch

        torch.cuda.set_per_process_memory_fraction(frac)


def role_streaming(a) -> None:
    from engine.calibrate.streaming import calibrate

    _cap(a.gpu_mem_fraction)
    layers: list = []

    class Sink:
        def emit(self, kind, **d):
            if kind == "metric" and d.get("name") == "calibrate.layer":
                layers.append({k: v for k, v in d["tags"].items() if k.endswith("_s") and k != "tokens_per_s"})

    t0 = time.monotonic()
    summary = calibrate(a.model, a.samples_file, a.out, seq_len=a.seq_len, batch_size=a.batch_size, device=a.device,
                        sink=Sink())
    res = {"wall_s": time.monotonic() - t0, "start_s": t0 - T_PROCESS, "phases": summary.pop("phases", None),
           "per_layer": layers, "summary": summary, **_peaks(a.device)}
    rank = int(os.environ.get("RANK", "0"))
    Path(a.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(res, default=str))


def role_modelopt(a) -> None:
    import contextlib

    import torch

    _cap(a.gpu_mem_fraction)
    t0 = time.monotonic()
    import modelopt.torch.quantization as mtq
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engine.calibrate.batches import plan_batches
    from engine.calibrate.samples import load_samples
    from engine.calibrate.streaming import layer_amax
    t_import = time.monotonic() - t0

    kw: dict = {"dtype": torch.bfloat16, "use_kernels": False, "local_files_only": True}  # no hub, ever
    if a.device == "cuda":
        if a.gpu_mem_fraction:
            cap = int(torch.cuda.get_device_properties(0).total_memory * a.gpu_mem_fraction * 0.8)
            kw.update(device_map="auto", max_memory={0: cap, "cpu": 400 * 2**30})
        else:
            kw.update(device_map="cuda")
    model = AutoModelForCausalLM.from_pretrained(a.model, **kw).eval()
    t_load = time.monotonic() - t0
    s = load_samples(a.samples_file, tokenizer=a.model, seq_len=a.seq_len)
    dev = "cuda" if a.device == "cuda" else "cpu"
    batches = [b for r in range(a.ranks) for b in plan_batches(s.input_ids, a.batch_size, a.ranks, r, 0)]

    fwd = [0.0]

    def loop(m):
        t = time.monotonic()
        for b in batches:
            m(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev))
        if dev == "cuda":
            torch.cuda.synchronize()
        fwd[0] += time.monotonic() - t

    t_s = time.monotonic()
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, loop)
    t_q = time.monotonic() - t_s
    amax = {k: v.cpu().reshape(-1) for k, v in layer_amax(model).items()}
    wall = time.monotonic() - t0
    save_file(amax, str(Path(a.out) / "modelopt_amax.safetensors"))
    phases = {"import_s": t_import, "from_pretrained_s": t_load - t_import, "samples_s": t_s - t0 - t_load,
              "forward_s": fwd[0], "quantize_s": t_q - fwd[0], "amax_s": wall - (t_s - t0) - t_q}
    Path(a.result).write_text(json.dumps({"wall_s": wall, "load_s": t_load, "start_s": t0 - T_PROCESS,
                                          "phases": {k: round(v, 3) for k, v in phases.items()},
                                          **_peaks(a.device)}))


def _run(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"benchmark step failed ({r.returncode}): {' '.join(cmd[:6])} ...")


def compare(stream_dir: Path, ref_file: Path) -> dict:
    from safetensors.torch import load_file

    from engine.calibrate.snapshot import load_amax

    ours, ref = load_amax(stream_dir), load_file(str(ref_file))
    keys = set(ours) & set(ref)
    worst, worst_key = 0.0, None
    for k in keys:
        x, y = ref[k].float(), ours[k].float().reshape(-1)
        rel = float(((x - y).abs() / x.abs().clamp_min(1e-30)).max())
        if rel > worst:
            worst, worst_key = rel, k
    return {"quantizers": len(ref), "missing": len(set(ref) - set(ours)), "extra": len(set(ours) - set(ref)),
            "max_rel_diff": worst, "worst": worst_key, "equal_1e-5": worst <= 1e-5 and set(ref) == set(ours)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="mid", choices=sorted(SIZES))
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--gpu-mem-fraction", type=float, default=None)
    p.add_argument("--work", default=os.environ.get("QD_BENCH_WORK", "/tmp/qd-bench-calibrate"))
    p.add_argument("--skip-modelopt", action="store_true")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed import warm-up process")
    p.add_argument("--role", choices=["streaming", "modelopt"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--samples-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "streaming":
        return role_streaming(a)
    if a.role == "modelopt":
        return role_modelopt(a)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    model, samples = build(work, a.size, a.samples, a.seq_len, a.device)
    os.sync()  # the fresh model's dirty pages reach the disk now, not during whichever tool runs first
    print(f"[bench] model {model} ready ({time.monotonic() - t:.1f}s)", file=sys.stderr)
    if not a.no_warmup:  # first imports on a fresh machine (bytecode compile, cold files) hit neither tool
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", WARMUP], check=False,
                       env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"[bench] import warm-up, not timed ({time.monotonic() - t:.1f}s)", file=sys.stderr)
    tag = f"{a.size}-r{a.ranks}-f{a.gpu_mem_fraction or 1}"
    out = work / f"amax-{tag}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--model", str(model), "--samples-file", str(samples), "--out", str(out), "--seq-len", str(a.seq_len),
              "--batch-size", str(a.batch_size), "--device", a.device, "--ranks", str(a.ranks)]
    if a.gpu_mem_fraction:
        common += ["--gpu-mem-fraction", str(a.gpu_mem_fraction)]
    me = str(Path(__file__).resolve())
    res_s = work / f"streaming-{tag}.json"
    t0 = time.monotonic()
    if a.ranks > 1:
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks), me, "--role",
              "streaming", "--result", str(res_s), *common], env)
    else:
        _run([sys.executable, me, "--role", "streaming", "--result", str(res_s), *common], env)
    stream_wall = time.monotonic() - t0
    ranks = [json.loads(res_s.with_suffix(f".rank{r}.json").read_text()) for r in range(a.ranks)]
    report: dict = {"size": a.size, "samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
                    "ranks": a.ranks, "gpu_mem_fraction": a.gpu_mem_fraction,
                    "streaming": {"wall_s": stream_wall, "calib_s": max(r["wall_s"] for r in ranks),
                                  "imports_before_calibrate_s": round(ranks[0].get("start_s", 0), 3),
                                  "phases_rank0": ranks[0].get("phases"),
                                  "per_layer_rank0": ranks[0].get("per_layer"),
                                  "peak_gpu_gb": max(r.get("peak_gpu_gb", 0) for r in ranks),
                                  "peak_rss_gb": max(r["peak_rss_gb"] for r in ranks)}}
    if not a.skip_modelopt:
        res_m = work / f"modelopt-{tag}.json"
        t0 = time.monotonic()
        _run([sys.executable, me, "--role", "modelopt", "--result", str(res_m), *common], env)
        mo = json.loads(res_m.read_text())
        mo["wall_with_process_s"] = time.monotonic() - t0
        report["modelopt"] = mo
        s = report["streaming"]
        report["wall_ratio"] = s["wall_s"] / mo["wall_with_process_s"]
        if mo.get("peak_gpu_gb"):
            report["gpu_mem_ratio"] = s["peak_gpu_gb"] / mo["peak_gpu_gb"]
        report["rss_ratio"] = s["peak_rss_gb"] / mo["peak_rss_gb"]
        report["amax"] = compare(out, out / "modelopt_amax.safetensors")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
