"""Benchmark: the quality of every quantdeck output of one trained model, beside modelopt's own fake-quant, in one run.

    python benchmarks/quality.py [--device cpu] [--steps 300] [--num-samples 64] [--seq-len 512] [--work DIR]
    python benchmarks/quality.py --model DIR      # a `quantdeck fixture --trained` directory built before

Builds (once, cached in --work) the trained tiny DeepSeek-V3 of `quantdeck fixture --trained` (BF16 and FP8 as
released, held-out and calibration samples from the standard library's Python sources). Then, each in its own fresh
process:
- `quantdeck convert --to fp8-block` (FP8-block, dynamic 1x128 activations when evaluated);
- `quantdeck convert --to nvfp4 --format both` (NVFP4 weight-only, modelopt and compressed-tensors layouts);
- `quantdeck calibrate` on the calibration samples, then `quantdeck export --format both` (NVFP4 W4A4);
- `quantdeck eval OUT --against SRC --samples HELDOUT --json` for each output, and for the source against itself;
- modelopt's reference: transformers' model of the BF16 source, `mtq.quantize(model, NVFP4_DEFAULT_CFG, loop)` with
  the loop over the same calibration samples, then its forward on the held-out samples; KLD, top-1 and perplexity
  against the source's logits, computed with the same per-token metrics as `quantdeck eval`.
Prints one table: KLD mean / p99, top-1 agreement, perplexity of the output (and of the source).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QUANTDECK = [sys.executable, "-m", "console.cli"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _qd(*args: str, ok=(0,), capture: bool = False) -> str:
    t = time.monotonic()
    r = subprocess.run([*QUANTDECK, *args], env=_env(), check=False,
                       stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       text=True)
    if r.returncode not in ok:
        raise SystemExit(f"quantdeck {' '.join(args)} failed ({r.returncode})")
    print(f"  quantdeck {args[0]} {' '.join(a for a in args[1:3])} ... {time.monotonic() - t:.0f} s", file=sys.stderr)
    return r.stdout if capture else ""


def build(a) -> Path:
    if a.model:
        return Path(a.model)
    model = Path(a.work) / f"trained-s{a.steps}"
    if not (model / "training.json").exists():
        _qd("fixture", "--trained", "--steps", str(a.steps), "--out", str(model), "--force")
    return model


def make_outputs(model: Path, work: Path, a) -> dict[str, Path]:
    src, calib = model / "bf16", model / "samples-calibration.json"
    outs = {"fp8-block": work / "fp8-block", "nvfp4-wo": work / "nvfp4-wo", "w4a4": work / "w4a4",
            "amax": work / "amax"}
    if not outs["fp8-block"].exists():
        _qd("convert", "--src", str(src), "--dst", str(outs["fp8-block"]), "--to", "fp8-block", "--device", a.device)
    if not outs["nvfp4-wo"].exists():
        _qd("convert", "--src", str(src), "--dst", str(outs["nvfp4-wo"]), "--to", "nvfp4", "--format", "both",
            "--device", a.device)
    if not outs["w4a4"].exists():
        _qd("calibrate", "--model", str(src), "--samples", str(calib), "--out", str(outs["amax"]), "--seq-len",
            str(a.seq_len), "--device", a.device, "--quiet")
        _qd("export", "--src", str(src), "--amax", str(outs["amax"]), "--dst", str(outs["w4a4"]), "--format",
            "both", "--quiet")
    return outs


def evaluate(out: Path, src: Path, held: Path, a) -> dict:
    text = _qd("eval", str(out), "--against", str(src), "--samples", str(held), "--num-samples", str(a.num_samples),
               "--seq-len", str(a.seq_len), "--device", a.device, "--json", ok=(0, 4), capture=True)
    return json.loads(text)


E2M1_STEPS = ((0.25, True, 0.0), (0.75, False, 0.5), (1.25, True, 1.0), (1.75, False, 1.5), (2.5, True, 2.0),
              (3.5, False, 3.0), (5.0, True, 4.0))


def _fp4_fake_quant_block(x, global_amax, block_size: int = 16):
    """modelopt's NVFP4 fake-quant kernel (`fp4_fake_quant_kernel`: E4M3 block scale of amax/6 under the global
    scale amax/(6*448), E2M1 magnitudes rounded half to even), in torch for CPUs, where modelopt has none."""
    import torch

    shape, dtype = x.shape, x.dtype
    t = x.reshape(-1, shape[-1]).float()
    pad = (-t.shape[-1]) % block_size
    t = torch.nn.functional.pad(t, (0, pad)).reshape(t.shape[0], -1, block_size)
    g = global_amax.float().amax() / (6.0 * 448.0)
    g = torch.where(g > 0, g, torch.full_like(g, 1e-12))
    bmax = t.abs().amax(-1, keepdim=True)
    scale = torch.clamp(bmax / (6.0 * g), max=448.0).to(torch.float8_e4m3fn).float() * g
    scale = torch.where(scale >= 1e-5, scale, torch.ones_like(scale))
    a = t.abs() / scale
    q = torch.full_like(a, 6.0)
    for bound, inclusive, value in reversed(E2M1_STEPS):
        q = torch.where(a <= bound if inclusive else a < bound, torch.full_like(a, value), q)
    y = torch.where(t >= 0, q * scale, -q * scale).reshape(t.shape[0], -1)[:, : shape[-1]]
    return y.reshape(shape).to(dtype)


def _patch_cpu_fake_quant() -> None:
    """Route modelopt's NVFP4 dynamic block quantization to `_fp4_fake_quant_block` for CPU tensors."""
    from modelopt.torch.quantization import tensor_quant

    cuda_op = tensor_quant.dynamic_block_quantize_op

    def op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        if inputs.is_cuda or (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != (4, 2, 8, 4):
            return cuda_op(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits)
        return _fp4_fake_quant_block(inputs, amax, block_size)

    tensor_quant.dynamic_block_quantize_op = op


def role_modelopt(a) -> None:
    """modelopt's fake-quant of the BF16 source: metrics against the source's own logits, written to a.result."""
    import copy

    import modelopt.torch.quantization as mtq
    import torch

    if a.device == "cpu":
        _patch_cpu_fake_quant()
    from transformers import AutoModelForCausalLM

    from engine.calibrate.layer import compute_dtype
    from engine.calibrate.samples import load_samples
    from engine.eval.metrics import TokenMetrics

    torch.set_num_threads(a.threads)
    src = Path(a.model) / "bf16"
    config = json.loads((src / "config.json").read_text())
    dtype = compute_dtype(config)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype, use_kernels=False,
                                                 local_files_only=True).eval().to(a.device)
    held = load_samples(Path(a.model) / "samples-heldout.json", num_samples=a.num_samples, tokenizer=str(src),
                        seq_len=a.seq_len)
    calib = load_samples(Path(a.model) / "samples-calibration.json", tokenizer=str(src), seq_len=a.seq_len)
    with torch.no_grad():
        ref = [model(torch.tensor([ids], device=a.device)).logits[0].cpu() for ids in held.input_ids]

    def loop(m):
        for ids in calib.input_ids:
            m(torch.tensor([ids], device=a.device))

    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), loop)
    enabled = sum(1 for n, m in model.named_modules() if n.endswith("_quantizer") and getattr(m, "is_enabled", False))
    metrics = TokenMetrics()
    with torch.no_grad():
        for ids, logits_src in zip(held.input_ids, ref, strict=True):
            x = torch.tensor(ids)
            logits = model(x[None].to(a.device)).logits[0].cpu()
            metrics.add(logits_src, logits, x, torch.ones_like(x))
    Path(a.result).write_text(json.dumps({**metrics.summary(), "quantizers_enabled": enabled,
                                          "dtype": str(dtype).replace("torch.", "")}))


ROWS = (("source BF16 (self)", "bf16", None), ("FP8-block", "fp8-block", None),
        ("NVFP4 W4A16 modelopt layout", "nvfp4-wo", "modelopt"),
        ("NVFP4 W4A16 compressed-tensors", "nvfp4-wo", "compressed-tensors"),
        ("NVFP4 W4A4 modelopt layout", "w4a4", "modelopt"),
        ("NVFP4 W4A4 compressed-tensors", "w4a4", "compressed-tensors"))


def table(rows: list[tuple[str, dict]], training: dict) -> str:
    head = (f"trained tiny DeepSeek-V3: {training['layers']} layers, {training['experts']} experts, hidden "
            f"{training['hidden']}, {training['steps']} steps; held-out ppl at training {training['heldout_ppl']:.2f} "
            f"(uniform {training['uniform_ppl']})")
    lines = [head,
             f"{'model':34} {'KLD mean':>10} {'KLD p99':>10} {'top-1':>7} {'ppl out':>8} {'ppl src':>8} {'tokens':>7}"]
    for name, r in rows:
        lines.append(f"{name:34} {r['kld_mean']:10.5f} {r['kld_p99']:10.5f} {r['top1_agree']:7.4f} "
                     f"{r['ppl_output']:8.3f} {r['ppl_source']:8.3f} {r['tokens']:7d}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--model", help="a `quantdeck fixture --trained` directory (default: build one in --work)")
    p.add_argument("--steps", type=int, default=300, help="training steps of the model built in --work")
    p.add_argument("--num-samples", type=int, default=48, help="held-out samples evaluated")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample at most (eval and calibration)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the modelopt process")
    p.add_argument("--work", default=os.environ.get("QD_BENCH_WORK", "/tmp/qd-bench-quality"))
    p.add_argument("--json", help="also write the whole report to this file")
    p.add_argument("--role", choices=["modelopt"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "modelopt":
        return role_modelopt(a)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build(a)
    src, held = model / "bf16", model / "samples-heldout.json"
    outs = make_outputs(model, work, a)
    rows: list[tuple[str, dict]] = []
    for name, key, layout in ROWS:
        out = src if key == "bf16" else outs[key] / layout if layout else outs[key]
        rows.append((name, evaluate(out, src, held, a)))
    result = work / "modelopt.json"
    t = time.monotonic()
    r = subprocess.run([sys.executable, __file__, "--role", "modelopt", "--model", str(model), "--device", a.device,
                        "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--threads",
                        str(a.threads), "--result", str(result)], env=_env(), check=False)
    if r.returncode != 0:
        raise SystemExit(f"modelopt reference failed ({r.returncode})")
    print(f"  modelopt fake-quant ... {time.monotonic() - t:.0f} s", file=sys.stderr)
    ref = json.loads(result.read_text())
    rows.append(("modelopt fake-quant W4A4 (reference)", ref))
    training = json.loads((model / "training.json").read_text())
    print(table(rows, training))
    if a.json:
        Path(a.json).write_text(json.dumps({"training": {k: v for k, v in training.items() if k != "losses"},
                                            "rows": dict(rows)}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
