"""Per-tensor NVFP4 math: quantdeck's kernels vs `fp8_to_nvfp4_streaming.py`'s functions, side by side in one run.

    python benchmarks/nvfp4_kernels.py [--rows 2048] [--cols 7168] [--repeat 5] [--device cpu|cuda|auto]
                                 [--peer PATH/fp8_to_nvfp4_streaming.py]

Input: a synthetic DeepSeek FP8 expert weight ([2048, 7168] float8_e4m3fn + 128×128 float32 scales).
On CUDA both contenders go from host FP8 tensors to host NVFP4 tensors (upload and download timed).
Each contender does the whole per-tensor job: dequantize, global amax → weight_scale_2, NVFP4 codes and
block scales. Prints MB/s of FP8 input (best of --repeat) and the ratio to the public script's. That module is
imported by path (its code is not copied). Not a test: wall-clock numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEER = "fp8_to_nvfp4_streaming.py"  # how its rows are labelled


def load_peer(path: Path):
    """The public script's module, imported by path (its code is not copied)."""
    spec = importlib.util.spec_from_file_location("peer_fp8_to_nvfp4", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up (kernels load or build here; CUDA initializes)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peer", type=Path, default=None, metavar="PATH",
                    help=f"a copy of the public {PEER}, to compare with (default: no comparison)")
    ap.add_argument("--skip-torch-reference", action="store_true")
    args = ap.parse_args(argv)
    if args.peer is not None and not args.peer.is_file():
        ap.error(f"--peer {args.peer}: no such file")

    import torch

    from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block
    from engine.formats.nvfp4.dispatch import fp8_block_amax, fp8_block_to_nvfp4, resolve_device
    from engine.formats.nvfp4.helpers import global_scale, quantize_nvfp4

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.rows, args.cols, generator=g) * 0.02
    q, s = cast_fp8_block(w)
    mb = q.numel() / 1e6
    print(f"input: FP8 [{args.rows}, {args.cols}] ({mb:.1f} MB) + scales {tuple(s.shape)}; torch threads "
          f"{torch.get_num_threads()}; device {device}", file=sys.stderr)

    results: dict[str, float] = {}
    outputs = {}

    def ours():
        qd, sd = (q, s) if device == "cpu" else (q.to(device), s.to(device))  # one upload for amax + quantize
        s2 = global_scale(fp8_block_amax(qd, sd, device=device))
        outputs["ours"] = fp8_block_to_nvfp4(qd, sd, s2, device=device)

    t0 = time.perf_counter()
    ours()
    first = time.perf_counter() - t0
    if device == "cpu":  # both CPU kernel technologies (engine.formats.cpu_kernels), over every core and on one
        import os

        from engine.formats.kernel_mode import serial_kernels

        def one_thread():
            with serial_kernels():
                ours()

        for tech in ("c", "numba"):
            os.environ["QUANTDECK_KERNELS"] = tech
            results[f"quantdeck ({tech}, every core)"] = best_time(ours, args.repeat)
            results[f"quantdeck ({tech}, one thread)"] = best_time(one_thread, args.repeat)
        os.environ.pop("QUANTDECK_KERNELS")
    else:
        import os

        from engine.formats.nvfp4 import kernels_triton

        if kernels_triton.available():
            results["quantdeck (cuda, triton)"] = best_time(ours, args.repeat)
        os.environ["QUANTDECK_NO_TRITON"] = "1"
        results["quantdeck (cuda, torch ops)"] = best_time(ours, args.repeat)

    if not args.skip_torch_reference and device == "cpu":

        def reference():
            x = dequant_fp8_block(q, s)
            outputs["ref"] = quantize_nvfp4(x, global_scale(x.abs().amax()))

        results["quantdeck torch reference"] = best_time(reference, max(1, args.repeat // 2))

    peer_name = None
    if args.peer is not None:
        peer = load_peer(args.peer)
        peer_name = PEER

        def run_peer():
            pq, ps = (q, s) if device == "cpu" else (q.to(device), s.to(device))  # host in, host out, as ours
            x = peer.dequant_fp8_to_fp32(pq, ps)
            s2 = peer.compute_global_scale(x)
            packed, bs = peer.quantize_to_nvfp4(x, s2)
            outputs["peer"] = (packed.cpu(), bs.cpu())

        results[peer_name] = best_time(run_peer, max(1, args.repeat // 2))
    else:
        print(f"no --peer: pass --peer path/to/{PEER} to compare with the public script", file=sys.stderr)

    if "ref" in outputs:
        same = torch.equal(outputs["ours"][0], outputs["ref"][0]) and torch.equal(
            outputs["ours"][1].view(torch.uint8), outputs["ref"][1].view(torch.uint8)
        )
        print(f"quantdeck kernel bytes == torch reference: {same}")
    if "peer" in outputs:
        diff = (outputs["ours"][0] != outputs["peer"][0]).float().mean().item()
        print(f"packed bytes differing from {PEER}'s: {diff:.4%} (it rounds E2M1 ties away from even)")
    print(f"first call (includes loading or building the kernels): {first:.2f} s")
    peer_t = results.get(peer_name) if peer_name else None
    rw = len(PEER) + 2  # the ratio column, there only with the public script's row
    print(f"{'contender':40s} {'best s':>9s} {'MB/s':>9s}" + (f" {'× ' + PEER:>{rw}s}" if peer_t else ""))
    for name, t in results.items():
        ratio = f" {peer_t / t:{rw}.1f}" if peer_t else ""
        print(f"{name:40s} {t:9.4f} {mb / t:9.1f}{ratio}")
    if device == "cpu" and not args.skip_torch_reference:
        _fp8_block_table(w, q, s, args.repeat)
    return 0


def _fp8_block_table(w, q, s, repeat: int) -> None:
    """FP8 block-128 cast (BF16 in: numba) and dequant to BF16 (FP8 in: C, else numba) vs the torch reference."""
    import torch

    from engine.formats import cpu_kernels
    from engine.formats.fp8_block.dispatch import cast_fp8_block_fast, dequant_fp8_block_fast
    from engine.formats.fp8_block.helpers import cast_fp8_block, dequant_fp8_block

    wb = w.to(torch.bfloat16)
    rows = {
        "fp8-block cast, numba (BF16 in)": (lambda: cast_fp8_block_fast(wb, device="cpu"), wb.numel() * 2),
        "fp8-block cast, torch (BF16 in)": (lambda: cast_fp8_block(wb), wb.numel() * 2),
        f"dequant to BF16, {cpu_kernels.backend()} (FP8 in)": (
            lambda: dequant_fp8_block_fast(q, s, device="cpu", dtype=torch.bfloat16), q.numel()),
        "dequant to BF16, torch (FP8 in)": (lambda: dequant_fp8_block(q, s).to(torch.bfloat16), q.numel()),
    }
    print(f"{'fp8-block kernels':40s} {'best s':>9s} {'MB/s':>9s}")
    for name, (fn, nbytes) in rows.items():
        t = best_time(fn, max(1, repeat // 2))
        print(f"{name:40s} {t:9.4f} {nbytes / 1e6 / t:9.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
