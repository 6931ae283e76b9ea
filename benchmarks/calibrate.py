"""Benchmark: quantdeck's layer-streaming calibration beside modelopt's whole-model flow and modelopt's own
layer-by-layer calibration, in one run.

    python benchmarks/calibrate.py --device cuda --size real --layers 2 --source fp8 [--samples 128 --seq-len 512
                                   --batch-size 8] [--ranks 2] [--gpu-mem-fraction 0.25] [--work DIR]
    python benchmarks/calibrate.py --device cpu --size mid-cpu --source fp8

Builds (once, cached in --work) a synthetic DeepSeek V3 checkpoint with transformers (random weights, real
byte-level tokenizer) and a samples file of random text (one byte = one token). `--size real` has DeepSeek-V3's
widths (hidden 7168, intermediate 18432, 256 routed experts of 2048 + 1 shared, top-8, 128 heads, q_lora 1536,
kv_lora 512; `--layers N` decoder layers, the first dense). Sources: the random BF16 model is cast to FP8-block by
`quantdeck convert --to fp8-block` (as DeepSeek releases it), and that FP8 model decoded back to BF16 with
`quantdeck convert --to bf16`: `--source bf16` calibrates the decoded one, so both sources hold the same weights and
the modelopt peers (which load BF16) give amax comparable to either.

Then, each in its own fresh process: quantdeck's `calibrate` (one process, or --ranks N under torchrun), modelopt's
whole-model flow (`from_pretrained` onto the GPU, then `mtq.quantize(model, NVFP4_DEFAULT_CFG, loop)` over the same
batches) and modelopt's layerwise flow (the same with `"layerwise": {"enable": true}` in the algorithm). Prints one
table: wall (process start included), per-layer read and forward, peak GPU memory, peak RSS, bytes read per rank, the
read floor (`cat` of the same shards, page cache dropped where allowed, and warm), and whether every amax agrees;
then each tool's interpreter start-up and exit. quantdeck's processes end as its CLI does (without the interpreter's
teardown: engine.core.procexit), modelopt's as its example scripts do (with it).
--gpu-mem-fraction caps every tool with torch.cuda.set_per_process_memory_fraction (modelopt then loads with
device_map="auto" and a max_memory that offloads the rest to CPU).

--eval then converts the calibrated source to weight-only NVFP4 (`quantdeck convert --to nvfp4`) and runs
`quantdeck eval` of it against the source it was converted from (the one calibrated) on the same samples and
batches, in a fresh process: each layer's eval seconds beside that layer's calibration seconds (read wait, build,
forward and quantizer work; eval runs three forwards a layer: the source's, the output's, and the output's on the
source's inputs).

Before timing, the built model is synced to disk and one untimed process imports torch, transformers and
modelopt (--no-warmup skips it): on a fresh machine the first import compiles bytecode and reads cold files,
which would otherwise land on whichever tool runs first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

T_PROCESS = time.monotonic()  # (this module's import: after the interpreter started)
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "unit" / "engine" / "calibrate"))
from _samples import write_random_text  # noqa: E402  (benchmarks/: the script's folder, first on sys.path)

import engine  # noqa: E402,F401  (offline: no hub downloads or hub kernels, before transformers is imported)

SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                 n_routed_experts=16, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, vocab_size=1024),
    "mid": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=704, num_hidden_layers=8,
                n_routed_experts=64, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=256, vocab_size=32000),
    # 2 cores in a few minutes: an FP8 MoE layer of 0.6 GB (64 experts of 1536), 1.2 GB in all
    "mid-cpu": dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1536, num_hidden_layers=3,
                    n_routed_experts=64, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=256, vocab_size=32000),
    # DeepSeek-V3's own widths
    "real": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=2,
                 n_routed_experts=256, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                 vocab_size=129280),
}


WARMUP = ("import torch, safetensors.torch, transformers, modelopt.torch.quantization, engine.calibrate.streaming; "
          "from transformers.models.deepseek_v3 import modeling_deepseek_v3; "
          "from transformers import AutoModelForCausalLM, AutoTokenizer")


def _convert(*args: str) -> None:
    """`quantdeck convert` through its dependency-light entry (no CLI or console packages needed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "engine.convert", *args], env=env, stdout=subprocess.DEVNULL)
    if r.returncode != 0:
        raise SystemExit(f"quantdeck convert {' '.join(args)} failed ({r.returncode})")


def build(work: Path, size: str, layers: int | None, n: int, seq_len: int, device: str,
          bf16_work: Path | None = None) -> tuple[dict, Path]:
    """{"bf16": dir, "fp8": dir} of one model (the BF16 one decoded from the FP8 one), and the samples file. The
    random model and the decoded BF16 copy go to `bf16_work` (default: `work`)."""
    spec = dict(SIZES[size], **({"num_hidden_layers": layers} if layers else {}))
    tag = f"v3-{size}-L{spec['num_hidden_layers']}"
    bwork = bf16_work or work
    dirs = {"fp8": work / f"{tag}-fp8", "bf16": bwork / f"{tag}-bf16"}
    samples = work / f"samples-{n}x{seq_len}.json"
    if not (dirs["bf16"] / "config.json").exists():
        raw = bwork / f"{tag}-random"
        _check_room(work, bwork, spec, dirs, raw)
        if not (dirs["fp8"] / "config.json").exists():
            if not (raw / "config.json").exists():
                _build_random(raw, spec, device)
            _convert("--src", str(raw), "--dst", str(dirs["fp8"]), "--to", "fp8-block", "--device", device)
        shutil.rmtree(raw, ignore_errors=True)  # the disk holds the FP8 and the decoded BF16, not a third model
        _convert("--src", str(dirs["fp8"]), "--dst", str(dirs["bf16"]), "--to", "bf16", "--device", device)
    if not samples.exists():
        write_random_text(samples, n, seq_len)
    return dirs, samples


def _bf16_bytes(spec: dict) -> int:
    """The BF16 checkpoint's size: the model's parameters counted on the meta device (nothing allocated)."""
    import torch
    from calib_tiny_models import v3_config
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(_v3_config(v3_config, spec))
    return 2 * sum(p.numel() for p in model.parameters())


def _check_room(work: Path, bwork: Path, spec: dict, dirs: dict, raw: Path) -> None:
    """Refuse before writing anything when the disks cannot hold the build. The random BF16 model and the decoded
    BF16 copy are never there together (the first is removed before the second is written), the FP8 cast sits beside
    each; --bf16-work puts the BF16 ones on another disk or a tmpfs."""
    bf16 = _bf16_bytes(spec)
    fp8 = bf16 // 2 + bf16 // 64  # one byte per weight, and its block scales (an upper bound)
    need: dict[int, tuple[Path, int]] = {}
    for root, nbytes in ((bwork, 0 if (raw / "config.json").exists() else bf16),
                         (work, 0 if (dirs["fp8"] / "config.json").exists() else fp8)):
        root.mkdir(parents=True, exist_ok=True)
        dev = os.stat(root).st_dev
        need[dev] = (root, need.get(dev, (root, 0))[1] + nbytes)
    for root, nbytes in need.values():
        free = shutil.disk_usage(root).free
        if nbytes > free:
            raise SystemExit(f"[bench] {root} has {free / 1e9:.1f} GB free and this build needs {nbytes / 1e9:.1f} GB "
                             f"there (BF16 {bf16 / 1e9:.1f} GB, FP8 {fp8 / 1e9:.1f} GB): pass --bf16-work on another "
                             f"disk or a tmpfs, or fewer --layers")


def _v3_config(v3_config, spec: dict):
    return v3_config(**spec, num_key_value_heads=spec["num_attention_heads"], n_group=8, topk_group=4,
                     num_experts_per_tok=8, first_k_dense_replace=1, qk_rope_head_dim=64, qk_nope_head_dim=128,
                     v_head_dim=128, max_position_embeddings=4096)


def _build_random(out: Path, spec: dict, device: str) -> None:
    import torch
    from calib_tiny_models import save_tokenizer, v3_config
    from transformers import DeepseekV3ForCausalLM

    cfg = _v3_config(v3_config, spec)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in BF16: half the memory of fp32-then-cast
    try:
        with torch.device(device if device != "auto" else "cpu"):
            model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(str(out), max_shard_size="5GB")
    save_tokenizer(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def read_floor(model_dir: Path) -> dict:
    """GB/s of `cat` over the checkpoint's shards, with the page cache dropped (where allowed) and warm."""
    shards = sorted(str(p) for p in model_dir.glob("*.safetensors"))
    size = sum(os.path.getsize(p) for p in shards)
    out: dict = {"bytes": size}
    for kind in ("cold", "warm"):
        if kind == "cold" and not drop_caches():
            out["cold_gbps"] = None
            continue
        t = time.monotonic()
        subprocess.run(["cat", *shards], stdout=subprocess.DEVNULL, check=True)
        out[f"{kind}_gbps"] = size / (time.monotonic() - t) / 1e9
    return out


def _vm_hwm_gb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across exec, so a role started by a parent
    that had just built a model would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _peaks(device: str) -> dict:
    """Peak RSS and GPU memory, and this process's start and the moment it reports (monotonic clock, the same in
    every process of the machine: the parent works out how long interpreter start-up and exit took)."""
    import torch

    out = {"peak_rss_gb": _vm_hwm_gb(), "t_process": T_PROCESS, "t_report": time.monotonic()}
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
                layers.append({k: v for k, v in d["tags"].items() if k.endswith("_s") and k != "tokens_per_s"}
                              | {k: d["tags"].get(k) for k in ("layer", "bytes_read", "seconds")})

    t0 = time.monotonic()
    summary = calibrate(a.model, a.samples_file, a.out, seq_len=a.seq_len, batch_size=a.batch_size, device=a.device,
                        sink=Sink())
    res = {"wall_s": time.monotonic() - t0, "start_s": t0 - T_PROCESS, "phases": summary.pop("phases", None),
           "per_layer": layers, "summary": summary, **_peaks(a.device)}
    rank = int(os.environ.get("RANK", "0"))
    Path(a.result).with_suffix(f".rank{rank}.json").write_text(json.dumps(res, default=str))


def role_eval(a) -> None:
    """`quantdeck eval` of --out (an NVFP4 checkpoint) against --model, each layer's seconds recorded."""
    from engine.eval.streaming import evaluate

    layers: list = []

    class Sink:
        def emit(self, kind, **d):
            if kind == "metric" and d.get("name") == "eval.layer":
                layers.append({k: d["tags"].get(k) for k in ("layer", "seconds", "build_s", "wait_s",
                                                             "source_build_s")})

    t0 = time.monotonic()
    rep = evaluate(a.out, a.model, a.samples_file, seq_len=a.seq_len, batch_size=a.batch_size, device=a.device,
                   sink=Sink())
    res = {"wall_s": time.monotonic() - t0, "start_s": t0 - T_PROCESS, "per_layer": layers,
           "kld_mean": rep["kld_mean"], "top1_agree": rep["top1_agree"], **_peaks(a.device)}
    Path(a.result).write_text(json.dumps(res, default=str))


def role_modelopt(a) -> None:
    import contextlib
    import copy

    import torch

    _cap(a.gpu_mem_fraction)
    t0 = time.monotonic()
    import modelopt.torch.quantization as mtq
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from engine.calibrate.batches import plan_batches
    from engine.calibrate.layer_pass import layer_amax
    from engine.calibrate.samples import load_samples
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

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    if a.layerwise:  # modelopt's own layer-by-layer calibration
        algo = cfg.get("algorithm") or "max"
        cfg["algorithm"] = dict(algo if isinstance(algo, dict) else {"method": algo}, layerwise={"enable": True})
    t_s = time.monotonic()
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        mtq.quantize(model, cfg, loop)
    t_q = time.monotonic() - t_s
    amax = {k: v.cpu().reshape(-1) for k, v in layer_amax(model).items()}
    wall = time.monotonic() - t0
    save_file(amax, str(Path(a.out) / f"modelopt{'-layerwise' if a.layerwise else ''}_amax.safetensors"))
    phases = {"import_s": t_import, "from_pretrained_s": t_load - t_import, "samples_s": t_s - t0 - t_load,
              "forward_s": fwd[0], "quantize_s": t_q - fwd[0], "amax_s": wall - (t_s - t0) - t_q}
    Path(a.result).write_text(json.dumps({"wall_s": wall, "load_s": t_load, "start_s": t0 - T_PROCESS,
                                          "phases": {k: round(v, 3) for k, v in phases.items()},
                                          **_peaks(a.device)}))


def _process_edges(spawned: float, reaped: float, res: dict) -> dict:
    """Seconds from spawning a tool's process to its script starting (interpreter start-up), and from its report
    to the process being reaped (interpreter exit: freeing GPU and page-locked memory, joining threads)."""
    if "t_process" not in res:
        return {}
    return {"interpreter_start_s": round(res["t_process"] - spawned, 3),
            "exit_s": round(reaped - res["t_report"], 3)}


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
            "max_rel_diff": worst, "worst": worst_key, "equal": worst == 0.0 and set(ref) == set(ours)}


def _table(report: dict) -> str:
    rows = [("tool", "wall s", "per MoE layer read / fwd s", "peak GPU GB", "peak RSS GB", "GB read/rank", "amax")]
    s = report["streaming"]
    moe = [x for x in s["per_layer_rank0"] or [] if x.get("layer", 0) >= 1] or s["per_layer_rank0"] or [{}]
    rd = sum(x.get("read_bg_s", x.get("read_wait_s", 0)) for x in moe) / max(len(moe), 1)
    fw = sum(x.get("forward_s", 0) for x in moe) / max(len(moe), 1)
    name = "quantdeck" + (f" (experts streamed: layers {s['streamed_layers']})" if s.get("streamed_layers") else "")
    rows.append((name, f"{s['wall_s']:.1f}", f"{rd:.2f} / {fw:.2f}", f"{s['peak_gpu_gb']:.1f}",
                 f"{s['peak_rss_gb']:.1f}", f"{s['bytes_read_per_rank_gb']:.1f}", "-"))
    for key, name in (("modelopt", "modelopt whole-model"), ("modelopt_layerwise", "modelopt layerwise")):
        m = report.get(key)
        if m and "failed" in m:
            rows.append((name, "failed", "-", "-", "-", "-", m["failed"]))
        elif m:
            rows.append((name, f"{m['wall_with_process_s']:.1f}", "-", f"{m.get('peak_gpu_gb', 0):.1f}",
                         f"{m['peak_rss_gb']:.1f}", "-", "equal" if m["amax"]["equal"] else
                         f"max rel diff {m['amax']['max_rel_diff']:.2e}"))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    f = report["read_floor"]
    cold = f"{f['cold_gbps']:.2f} GB/s" if f.get("cold_gbps") else "not measured (page cache not droppable)"
    lines.append(f"read floor (cat of the {report['source']} shards, {f['bytes'] / 1e9:.1f} GB): cold {cold}, "
                 f"warm {f['warm_gbps']:.2f} GB/s")
    for key, m in (("quantdeck", report["streaming"]), ("modelopt", report.get("modelopt") or {}),
                   ("modelopt_layerwise", report.get("modelopt_layerwise") or {})):
        if "exit_s" in m:
            lines.append(f"{key}: interpreter start-up {m['interpreter_start_s']:.2f} s, exit {m['exit_s']:.2f} s")
    for key in ("modelopt", "modelopt_layerwise"):
        if "wall_with_process_s" in report.get(key, {}):
            ratio = report["streaming"]["wall_s"] / report[key]["wall_with_process_s"]
            lines.append(f"quantdeck / {key}: wall {ratio:.2f}x")
    for e in (report.get("eval") or {}).get("per_layer_vs_calibration", []):
        lines.append(f"eval layer {e['layer']}: {e['eval_s']:.2f} s (waiting for reads {e.get('wait_s') or 0:.2f}, "
                     f"source layer built {e.get('source_build_s') or 0:.2f}, both built {e.get('build_s') or 0:.2f}), "
                     f"calibration {e['calibrate_s'] or 0:.2f} s: {e['ratio']}x")
    return "\n".join(lines)


def eval_beside_calibration(a, dirs: dict, samples: Path, work: Path, env: dict, streaming: dict) -> dict:
    """--eval: the source converted to weight-only NVFP4, then eval against that source; per layer, eval's
    seconds and calibration's (read wait, assembly, build, forward, quantizers, write) and their ratio."""
    out = work / f"{dirs[a.source].name}-nvfp4"
    if not (out / "config.json").exists():
        _convert("--src", str(dirs[a.source]), "--dst", str(out), "--to", "nvfp4", "--device", a.device)
    res = work / "eval.json"
    t0 = time.monotonic()
    _run([sys.executable, str(Path(__file__).resolve()), "--role", "eval", "--result", str(res), "--model",
          str(dirs[a.source]), "--out", str(out), "--samples-file", str(samples), "--seq-len", str(a.seq_len),
          "--batch-size", str(a.batch_size), "--device", a.device], env)
    ev = json.loads(res.read_text())
    ev["wall_with_process_s"] = time.monotonic() - t0
    calib = {x["layer"]: x for x in streaming.get("per_layer_rank0") or []}
    ev["per_layer_vs_calibration"] = [
        {"layer": e["layer"], "eval_s": e["seconds"], "wait_s": e.get("wait_s"),
         "source_build_s": e.get("source_build_s"), "build_s": e.get("build_s"),
         "calibrate_s": calib[e["layer"]].get("seconds"),
         "ratio": round(e["seconds"] / calib[e["layer"]]["seconds"], 2) if calib.get(e["layer"], {}).get("seconds")
         else None} for e in ev["per_layer"]]
    return ev


def _bytecode_note() -> None:
    """Every tool below imports torch, transformers and modelopt: where Python compiles them at each start, their
    imports take several times longer and the walls say more about that than about calibration."""
    from engine.runs.preflight import bytecode_note

    if (note := bytecode_note()) is not None:
        print(f"[bench] note: {note}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--size", default="mid", choices=sorted(SIZES))
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the size's)")
    p.add_argument("--source", default="bf16", choices=["bf16", "fp8"], help="what quantdeck calibrates from")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--gpu-mem-fraction", type=float, default=None)
    p.add_argument("--work", default=os.environ.get("QD_BENCH_WORK", "/tmp/qd-bench-calibrate"))
    p.add_argument("--bf16-work", default=None,
                   help="where the random BF16 model and the decoded BF16 copy go (default: --work); a disk that "
                        "cannot hold a model in BF16 and FP8 together can put them on another disk or a tmpfs")
    p.add_argument("--skip-modelopt", action="store_true", help="run neither modelopt flow")
    p.add_argument("--skip-layerwise", action="store_true", help="skip modelopt's layerwise flow")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed import warm-up process")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each tool (where allowed)")
    p.add_argument("--eval", action="store_true", help="also time quantdeck eval against calibration, per layer")
    p.add_argument("--json", help="also write the whole report to this file")
    p.add_argument("--role", choices=["streaming", "modelopt", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--layerwise", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--samples-file", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role in ("streaming", "eval"):  # ended as `quantdeck calibrate` and `quantdeck eval` end (console.cli)
        from engine.core.procexit import end_process

        (role_streaming if a.role == "streaming" else role_eval)(a)
        end_process(0)
    if a.role == "modelopt":  # ended as modelopt's example scripts end: the interpreter's teardown included
        return role_modelopt(a)
    _bytecode_note()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    dirs, samples = build(work, a.size, a.layers, a.samples, a.seq_len, a.device,
                          Path(a.bf16_work) if a.bf16_work else None)
    os.sync()  # the fresh model's dirty pages reach the disk now, not during whichever tool runs first
    print(f"[bench] models {dirs['fp8'].name}, {dirs['bf16'].name} ready ({time.monotonic() - t:.1f}s)",
          file=sys.stderr)
    if not a.no_warmup:  # first imports on a fresh machine (bytecode compile, cold files) hit neither tool
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", WARMUP], check=False,
                       env=dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"[bench] import warm-up, not timed ({time.monotonic() - t:.1f}s)", file=sys.stderr)
    floor = read_floor(dirs[a.source])  # ends warm: every tool below reads from the page cache
    tag = f"{dirs[a.source].name}-r{a.ranks}-f{a.gpu_mem_fraction or 1}"
    out = work / f"amax-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    common = ["--samples-file", str(samples), "--out", str(out), "--seq-len", str(a.seq_len),
              "--batch-size", str(a.batch_size), "--device", a.device, "--ranks", str(a.ranks)]
    if a.gpu_mem_fraction:
        common += ["--gpu-mem-fraction", str(a.gpu_mem_fraction)]
    me = str(Path(__file__).resolve())
    res_s = work / f"streaming-{tag}.json"
    if a.cold:
        drop_caches()
    t0 = time.monotonic()
    src = ["--model", str(dirs[a.source])]
    if a.ranks > 1:
        _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks), me, "--role",
              "streaming", "--result", str(res_s), *src, *common], env)
    else:
        _run([sys.executable, me, "--role", "streaming", "--result", str(res_s), *src, *common], env)
    stream_wall = time.monotonic() - t0
    ranks = [json.loads(res_s.with_suffix(f".rank{r}.json").read_text()) for r in range(a.ranks)]
    edges = _process_edges(t0, t0 + stream_wall, ranks[0]) if a.ranks == 1 else {}  # (torchrun's own start, exit)
    report: dict = {"size": a.size, "layers": a.layers, "source": a.source, "cold": a.cold, "samples": a.samples,
                    "seq_len": a.seq_len, "batch_size": a.batch_size, "ranks": a.ranks,
                    "gpu_mem_fraction": a.gpu_mem_fraction, "read_floor": floor,
                    "streaming": {"wall_s": stream_wall, "calib_s": max(r["wall_s"] for r in ranks),
                                  "imports_before_calibrate_s": round(ranks[0].get("start_s", 0), 3), **edges,
                                  "phases_rank0": ranks[0].get("phases"),
                                  "per_layer_rank0": ranks[0].get("per_layer"),
                                  "bytes_read_per_rank_gb": max(float(r["summary"].get("bytes_read", 0))
                                                                for r in ranks) / 1e9,
                                  "peak_gpu_gb": max(r.get("peak_gpu_gb", 0) for r in ranks),
                                  "peak_rss_gb": max(r["peak_rss_gb"] for r in ranks),
                                  "streamed_layers": ranks[0]["summary"].get("streamed_layers", []),
                                  "expert_weights_decoded": ranks[0]["summary"].get("expert_weights_decoded", 0)}}
    peers = [] if a.skip_modelopt else [("modelopt", [])] + ([] if a.skip_layerwise else
                                                           [("modelopt_layerwise", ["--layerwise"])])
    for key, flags in peers:
        res_m = work / f"{key}-{tag}.json"
        if a.cold:
            drop_caches()
        t0 = time.monotonic()
        res_m.unlink(missing_ok=True)
        r = subprocess.run([sys.executable, me, "--role", "modelopt", "--result", str(res_m), "--model",
                            str(dirs["bf16"]), *flags, *common], env=env)
        if r.returncode != 0:  # e.g. a model larger than the GPU: a row that says so, and the other peers still run
            report[key] = {"failed": f"exit {r.returncode} after {time.monotonic() - t0:.1f} s (its stderr above)"}
            continue
        mo = json.loads(res_m.read_text())
        mo["wall_with_process_s"] = time.monotonic() - t0
        mo.update(_process_edges(t0, t0 + mo["wall_with_process_s"], mo))
        ref = out / f"{key.replace('_', '-')}_amax.safetensors"
        mo["amax"] = compare(out, ref)
        report[key] = mo
    if "wall_s" in report.get("modelopt", {}):
        mo, s = report["modelopt"], report["streaming"]
        report["wall_ratio"] = s["wall_s"] / mo["wall_with_process_s"]
        if mo.get("peak_gpu_gb"):
            report["gpu_mem_ratio"] = s["peak_gpu_gb"] / mo["peak_gpu_gb"]
        report["rss_ratio"] = s["peak_rss_gb"] / mo["peak_rss_gb"]
        report["amax"] = mo["amax"]
    if a.eval:
        report["eval"] = eval_beside_calibration(a, dirs, samples, work, env, report["streaming"])
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print(_table(report))


if __name__ == "__main__":
    main()
