#!/usr/bin/env python3
"""Benchmark: quantdeck convert vs `fp8_to_nvfp4_streaming.py` vs a cold `cp -r`, in one run.

Builds (once, cached in --workdir) a synthetic FP8 checkpoint of about --size-gb in the DeepSeek V4
uniform-FP8 naming that the public script reads correctly (`layers.N.ffn.experts.E.w1/w2/w3.weight` FP8 [2048, 7168]
with UE8M0 `.scale` companions over 128×128 blocks, plus a little attention, norms and router), then times,
each after dropping the page cache where the machine allows it (`echo 3 > /proc/sys/vm/drop_caches`;
with `--cold data`, only the source's and the outputs' pages are evicted (posix_fadvise DONTNEED after a
sync), so python's and torch's own files stay warm as on an operator's machine after a first python run):

  cp        cold `cp -r SRC DST`
  cp+sync   the same, then `sync`: the copy made durable
  quantdeck `python -m console convert --src SRC --dst DST --to nvfp4 --device D [--workers N]`, writing as cp
            and the public script do (page cache, no fsync: the default)
  qd-durable the same with QUANTDECK_FSYNC=1: every shard fsynced before it is recorded (as a run's stages
            on other hosts write), to compare with cp+sync
  fp8_to_nvfp4_streaming.py
            `python fp8_to_nvfp4_streaming.py --src --dst --gpu G`, the public script, run only when `--peer PATH`
            names a copy of it (JSON key "peer"). On CPU, --gpu -1, it crashes: its writer buffers the same
            weight_scale_2 tensor under two names and safetensors refuses to save shared tensors — the run is
            recorded with its error
  fp8_to_nvfp4_streaming.py + clone
            the same script patched ONLY to clone tensors before buffering (a textual replacement, generated at
            benchmark time into a temp dir), so that it runs on CPU (JSON key "peer+clone")

and prints wall time, ratio to quantdeck and peak RSS of each child process tree (psutil polling, plus
getrusage(RUSAGE_CHILDREN).ru_maxrss). A second table compares the per-tensor math alone on one
[2048, 7168] w1/w3 expert pair (MB/s of FP8 input).

Usage:  python benchmarks/convert.py [--size-gb 1.6] [--device cpu|cuda] [--workers 1] [--workdir DIR]
                                     [--cold all|data] [--peer PATH/fp8_to_nvfp4_streaming.py] [--json]
Targets: CPU (2 cores, ~1.6 GB): quantdeck >= 6x faster than fp8_to_nvfp4_streaming.py + clone, peak RSS <= 2 GB,
math >= 10x. GPU (>= 7 GB): quantdeck wall <= 0.5x fp8_to_nvfp4_streaming.py's and <= 1.0x the cold copy, peak RSS
<= 2 GB.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEER_HINT = "pass --peer path/to/fp8_to_nvfp4_streaming.py to compare with the public script"
# the rows printed for the public script's runs (their JSON keys stay "peer" and "peer+clone")
LABELS = {"peer": "fp8_to_nvfp4_streaming.py", "peer+clone": "fp8_to_nvfp4_streaming.py + clone"}
OUT, IN = 2048, 7168  # one routed expert of DeepSeek V4: w1/w3 [2048, 7168], w2 [7168, 2048]


# -- the synthetic source ---------------------------------------------------------------------------------
def _fp8_weight(shape, gen):
    import torch

    from engine.formats.fp8_block.helpers import cast_fp8_block

    w = torch.randn(shape, generator=gen) * 0.02
    return cast_fp8_block(w, ue8m0=True)


def build_source(path: Path, size_gb: float, seed: int = 0) -> Path:
    """A V4 uniform-FP8 checkpoint of about size_gb (cached: rebuilt only when the size differs)."""
    import torch

    from engine.checkpoint import CheckpointWriter, TensorSpec, plan_shards

    stamp = path / ".bench_source.json"
    want = {"size_gb": size_gb, "seed": seed, "v": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return path
    shutil.rmtree(path, ignore_errors=True)
    per_expert = 3 * OUT * IN
    experts = max(1, round(size_gb * 1e9 / per_expert))
    layers = max(1, min(4, experts // 8))
    per_layer = -(-experts // layers)
    hidden = IN
    tensors: list[tuple[str, tuple, str]] = []  # name, shape, kind
    for layer in range(layers):
        p = f"layers.{layer}."
        tensors += [(p + "attn_norm.weight", (hidden,), "norm"), (p + "ffn_norm.weight", (hidden,), "norm"),
                    (p + "attn.wq_a.weight", (1024, hidden), "fp8"),
                    (p + "ffn.gate.weight", (per_layer, hidden), "bf16")]
        for e in range(min(per_layer, experts - layer * per_layer)):
            for w, shape in (("w1", (OUT, IN)), ("w2", (IN, OUT)), ("w3", (OUT, IN))):
                tensors.append((f"{p}ffn.experts.{e}.{w}.weight", shape, "fp8"))
    tensors += [("embed.weight", (1024, hidden), "bf16"), ("norm.weight", (hidden,), "norm")]
    units = []
    for name, shape, kind in tensors:
        if kind == "fp8":
            grid = (-(-shape[0] // 128), -(-shape[1] // 128))
            scale = name[: -len(".weight")] + ".scale"
            units.append([TensorSpec(name, "F8_E4M3", shape), TensorSpec(scale, "F8_E8M0", grid)])
        else:
            units.append([TensorSpec(name, "BF16", shape)])
    plans = plan_shards(units, shard_size=int(2e9))
    w = CheckpointWriter(path, plans, source_fingerprint="bench", args=want)
    gen = torch.Generator().manual_seed(seed)
    kinds = {n: k for n, _, k in tensors}
    print(f"building a {size_gb} GB synthetic V4 FP8 source: {layers} layers, {experts} experts, "
          f"{len(plans)} shard(s)", file=sys.stderr)
    for plan in w.prepare():
        sf = w.open_shard(plan)
        for spec in plan.tensors:
            if spec.name.endswith(".scale"):
                continue
            if kinds[spec.name] == "fp8":
                q, s = _fp8_weight(spec.shape, gen)
                sf.write(spec.name, q)
                sf.write(spec.name[: -len(".weight")] + ".scale", s)
            elif kinds[spec.name] == "norm":
                sf.write(spec.name, torch.ones(spec.shape, dtype=torch.bfloat16))
            else:
                sf.write(spec.name, (torch.randn(spec.shape, generator=gen) * 0.02).to(torch.bfloat16))
        sf.close()
    w.finalize()
    (path / "manifest.json").unlink()
    config = {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"],
              "num_hidden_layers": layers, "n_routed_experts": per_layer, "hidden_size": hidden,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                      "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text("{}")
    stamp.write_text(json.dumps(want))
    return path


# -- measuring -----------------------------------------------------------------------------------------------
def evict(root: Path) -> int:
    """Drop the page cache of every file under `root` (after a sync): DONTNEED, file by file."""
    n = 0
    for p in root.rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    n += 1
                finally:
                    os.close(fd)
            except OSError:
                pass
    return n


def cold_data(work: Path) -> str:
    """Evict the benchmark's data (source and outputs under `work`) from the page cache, nothing else."""
    subprocess.run(["sync"], check=False)
    n = evict(work)
    return f"data evicted ({n} files)"


def drop_caches() -> str:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "dropped"
    except OSError as e:
        return f"not allowed ({e.strerror})"


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_timed(cmd: list[str], env=None, cwd=None) -> dict:
    """Run `cmd`, polling the RSS of its whole process tree; returns wall, peak RSS, rc, stderr tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def poll():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.05)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    stop.set()
    th.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"cmd": " ".join(cmd), "wall_s": round(wall, 2), "peak_rss_gb": round(peak / 1e9, 3),
            "ru_maxrss_gb": round(ru / 1e9, 3) if ru > before * 1024 else None, "rc": proc.returncode,
            "stderr_tail": err.strip().splitlines()[-1] if err.strip() else "", "stdout_tail": out.strip()[-300:],
            "stdout_tail_full": out.strip()[-20000:]}


def patched_peer(peer: Path, tmp: Path) -> Path:
    """The public script with ONE change: tensors are cloned before buffering (so shared scale tensors save)."""
    text = peer.read_text()
    old = "t = tensor.detach().cpu().contiguous()"
    if old not in text:
        raise SystemExit(f"cannot patch {peer}: {old!r} not found")
    out = tmp / "peer_clone.py"
    out.write_text(text.replace(old, "t = tensor.detach().cpu().contiguous().clone()", 1))
    return out


# -- math only ------------------------------------------------------------------------------------------------
def math_bench(device: str, peer_path: Path | None) -> dict:
    """MB/s of quantdeck's per-tensor math on one w1/w3 pair, and of the public script's when peer_path is given."""
    import importlib.util

    import torch

    from engine.convert import kernels
    from engine.formats.nvfp4.helpers import global_scale

    gen = torch.Generator().manual_seed(1)
    (w1, s1), (w3, s3) = _fp8_weight((OUT, IN), gen), _fp8_weight((OUT, IN), gen)
    mb = 2 * OUT * IN / 1e6
    dev = torch.device("cuda" if device == "cuda" else "cpu")

    def ours():  # as the converter does it: one upload per tensor, amax and fused quantization on the device
        a1, b1, a3, b3 = (t.to(dev, non_blocking=True) for t in (w1, s1, w3, s3))
        a = torch.maximum(kernels.fp8_block_amax(a1, b1, (128, 128), dev),
                          kernels.fp8_block_amax(a3, b3, (128, 128), dev))
        s2 = global_scale(a)
        kernels.fp8_block_to_nvfp4(a1, b1, (128, 128), s2, dev)
        kernels.fp8_block_to_nvfp4(a3, b3, (128, 128), s2, dev)

    res = {"quantdeck": _mb_s(ours, mb, dev)}
    if peer_path is None:
        return res
    spec = importlib.util.spec_from_file_location("peer", peer_path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    peer.FP4_BOUNDARIES = peer.FP4_BOUNDARIES.to(dev)

    def theirs():
        a = peer.dequant_fp8_to_fp32(w1.to(dev), s1.to(dev))
        b = peer.dequant_fp8_to_fp32(w3.to(dev), s3.to(dev))
        s2 = peer.compute_global_scale(a, b)
        peer.quantize_to_nvfp4(a, s2)
        peer.quantize_to_nvfp4(b, s2)

    res["peer"] = _mb_s(theirs, mb, dev)
    res["ratio"] = round(res["quantdeck"] / res["peer"], 1)
    return res


def _mb_s(fn, mb: float, dev) -> float:
    """MB/s of fn over 3 calls after a warm-up (numba load / CUDA init)."""
    import torch

    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.monotonic()
    n = 3
    for _ in range(n):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return round(mb * n / (time.monotonic() - t0), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.6)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shard-size", default="5GB", help="quantdeck's output shard size (default 5GB)")
    ap.add_argument("--workdir", default=None,
                    help="where the source and outputs go, kept for the next run "
                         "(default: a temp dir, removed at exit)")
    ap.add_argument("--skip-peer", action="store_true",
                    help="skip fp8_to_nvfp4_streaming.py's conversion runs even when --peer is given")
    ap.add_argument("--cold", default="all", choices=["all", "data"],
                    help="all: drop the whole page cache before each run; data: evict only the "
                         "source and output files, so python's and torch's files stay warm")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--peer", type=Path, default=None, metavar="PATH",
                    help="a copy of the public fp8_to_nvfp4_streaming.py, to compare with (default: no comparison)")
    ap.add_argument("--entry", default="console", choices=["console", "engine.convert"],
                    help="quantdeck entry point: the CLI (python -m console convert) or python -m engine.convert "
                         "(same function, for machines without the CLI's dependencies)")
    args = ap.parse_args()
    peer_path = args.peer.resolve() if args.peer else None
    if peer_path is None:
        print(f"no --peer: {PEER_HINT}", file=sys.stderr)
    elif not peer_path.is_file():
        ap.error(f"--peer {args.peer}: no such file")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.workdir:  # a temp dir holds ~4.5× --size-gb at the end: removed at exit (--workdir keeps it)
        atexit.register(shutil.rmtree, work, True)
    src = build_source(work / "src", args.size_gb)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    import torch

    gpu = torch.cuda.is_available()
    device = args.device  # quantdeck gets it as asked; "auto" resolves as quantdeck resolves it (for the math row)
    if device == "auto":
        from engine.convert.device import choose_device

        device = choose_device("auto", "nvfp4").device
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict[str, dict] = {}

    def fresh(name: str) -> Path:
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        return out

    runs = [("cp", lambda: ["cp", "-r", str(src), str(fresh("out_cp"))]),
            # the copy made durable, to compare with qd-durable (everything else was synced before the cache drop,
            # so `sync` flushes only cp's data)
            ("cp+sync", lambda: ["sh", "-c", f"cp -r {shlex.quote(str(src))} {shlex.quote(str(fresh('out_cps')))} "
                                             "&& sync"])]
    entry = ["-m", "console", "convert"] if args.entry == "console" else ["-m", "engine.convert"]

    def quantdeck(out: str):
        return lambda: ([sys.executable, *entry, "--src", str(src), "--dst", str(fresh(out)), "--to", "nvfp4",
                         "--device", args.device, "--workers", str(args.workers), "--shard-size", args.shard_size]
                        + (["--json"] if args.entry == "console" else []))

    # the default writes as cp and the public script do (page cache, no fsync); qd-durable fsyncs every shard, as a
    # run's stages on other hosts do (QUANTDECK_FSYNC=1, engine.checkpoint.writer), to compare with cp+sync
    runs.append(("quantdeck", quantdeck("out_qd")))
    runs.append(("qd-durable", quantdeck("out_qd_durable")))
    run_env = {"quantdeck": {"QUANTDECK_FSYNC": "0"}, "qd-durable": {"QUANTDECK_FSYNC": "1"}}
    tmp = Path(tempfile.mkdtemp(prefix="qd-peer-"))
    if peer_path and not args.skip_peer:
        # the public script on its best path: its GPU one wherever there is a GPU (its CPU path crashes)
        runs.append(("peer", lambda: [sys.executable, str(peer_path), "--src", str(src), "--dst",
                                      str(fresh("out_peer")), "--gpu", "0" if gpu else "-1"]))
        if not gpu:
            clone = patched_peer(peer_path, tmp)
            runs.append(("peer+clone", lambda: [sys.executable, str(clone), "--src", str(src), "--dst",
                                                str(fresh("out_peer_clone")), "--gpu", "-1"]))
    if args.cold == "data":  # an operator's machine after a first python run: the interpreter's files are warm
        subprocess.run([sys.executable, "-c", "import torch, numba, numpy"], check=False, env=env)
    for name, make in runs:
        cache = drop_caches() if args.cold == "all" else cold_data(work)
        cmd = make()
        print(f"running {LABELS.get(name, name)} (page cache {cache}) ...", file=sys.stderr)
        results[name] = run_timed(cmd, env=env | run_env.get(name, {}), cwd=str(REPO)) | {"page_cache": cache}
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        results["quantdeck"]["summary"] = json.loads(results["quantdeck"].get("stdout_tail_full") or "{}")
    except ValueError:
        pass
    for r in results.values():
        r.pop("stdout_tail_full", None)
    qd = results["quantdeck"]["wall_s"]
    for r in results.values():
        r["x_vs_quantdeck"] = round(r["wall_s"] / qd, 2) if qd else None
    math = math_bench(device, peer_path)
    report = {"source_gb": round(src_bytes / 1e9, 3), "device": device, "workers": args.workers, "cold": args.cold,
              "cores": os.cpu_count(), "runs": results, "math_mb_s": math, "workdir": str(work)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"source {report['source_gb']} GB FP8 (V4 uniform-FP8 naming), --device {args.device} ({device}), "
              f"{os.cpu_count()} cores, GPU {'yes' if gpu else 'no'}, "
              f"cold {args.cold} "
              f"({'whole page cache dropped' if args.cold == 'all' else 'only source and outputs evicted'})")
        width = max(11, *(len(LABELS.get(name, name)) for name in results))
        print(f"{'tool':<{width}} {'wall s':>8} {'vs qd':>7} {'peak RSS GB':>12} {'rc':>4}  note")
        for name, r in results.items():
            note = "" if r["rc"] == 0 else r["stderr_tail"][:90]
            print(f"{LABELS.get(name, name):<{width}} {r['wall_s']:>8.2f} {r['x_vs_quantdeck']:>6.2f}x "
                  f"{r['peak_rss_gb']:>12.3f} {r['rc']:>4}  {note}")
        def ratio(a: str, b: str) -> str:
            ra, rb = results.get(a), results.get(b)
            return f"{ra['wall_s'] / rb['wall_s']:.2f}x" if ra and rb and rb["wall_s"] else "-"

        print(f"targets: quantdeck/fp8_to_nvfp4_streaming.py {ratio('quantdeck', 'peer')}, quantdeck/cp "
              f"{ratio('quantdeck', 'cp')}; durable: qd-durable/(cp+sync) {ratio('qd-durable', 'cp+sync')}, "
              f"qd-durable/fp8_to_nvfp4_streaming.py {ratio('qd-durable', 'peer')}")
        qs = results["quantdeck"].get("summary") or {}
        if qs:
            print(f"quantdeck inside: convert {qs.get('wall_s')} s of {results['quantdeck']['wall_s']} s wall "
                  f"(the rest is the interpreter's start and the imports), busy {qs.get('busy_s')}")
            if qs.get("timeline_s"):
                print(f"quantdeck timeline (s since process start): {qs['timeline_s']}")
        theirs = f", fp8_to_nvfp4_streaming.py {math['peer']} MB/s ({math['ratio']}x)" if "peer" in math else ""
        print(f"math on one [2048, 7168] w1/w3 pair: quantdeck {math['quantdeck']} MB/s{theirs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
