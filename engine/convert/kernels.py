"""The converter's hot loops, delegated to engineer A's kernels (engine.formats.nvfp4.dispatch: numba on CPU,
torch on CUDA; bytes identical to the torch reference). Results are CPU tensors.

Why numba on CPU: on 2 cores the bit-exact vectorized torch path measured ~38 MB/s of FP8 input (the peer's
speed), while the fused numba kernel (dequant + block amax + E2M1 rounding + packing in one pass, no
temporaries) runs at 600-950 MB/s: the conversion becomes I/O bound.
"""

from __future__ import annotations

import atexit

import torch

from engine.formats.nvfp4 import dispatch


def _dev(device: torch.device | str) -> str:
    d = torch.device(device)
    return "cpu" if d.type == "cpu" else (f"cuda:{d.index}" if d.index is not None else "cuda")


_WARMING: list = []  # (device type, thread) of the warm-ups started in this process and not yet seen finished


def _after_cuda_warm_up(dev: str) -> str:
    """On CUDA, wait until the warm-up compiled the Triton kernel: a compute thread that calls it first would
    compile it again beside the warm-up (on a machine with a cold Triton cache, each concurrent compile holds
    hundreds of MB to GBs: measured 6.6 GB peak RSS with three compute threads, 1.7 GB once cached)."""
    if dev != "cpu":
        for kind, t in list(_WARMING):
            if kind == "cuda":
                t.join(timeout=600)
    return dev


def fp8_block_amax(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """max |fp32(code) · scale| of an FP8-block weight, without materializing it."""
    return dispatch.fp8_block_amax(w, scale, _after_cuda_warm_up(_dev(device)), block=block)


def fp8_block_to_nvfp4(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], scale_2: torch.Tensor,
                       device: torch.device | str = "cpu"):
    """(packed uint8, block_scale e4m3) of an FP8-block weight quantized with `scale_2` (fused, one pass)."""
    return dispatch.fp8_block_to_nvfp4(w, scale, scale_2, _after_cuda_warm_up(_dev(device)), block=block)


def float_to_nvfp4(w: torch.Tensor, scale_2: torch.Tensor, device: torch.device | str = "cpu"):
    """(packed uint8, block_scale e4m3) of a 2-D float weight."""
    return dispatch.bf16_to_nvfp4(w, scale_2, _dev(device))


def warm_up(target: str, device: torch.device | str) -> None:
    """Get the slow one-time set-ups going on a background thread, so that they overlap planning and the
    first reads instead of stalling the first tensor: on CPU, import numba and load the cached kernels
    (~0.8 s on 2 cores); on CUDA, create the device context (and the pinned-memory allocator), import
    Triton and load its fused kernel (up to ~1-2 s, which the first FP8 item otherwise waits for). Where the
    process froze its objects out of the garbage collector's full passes (the converter's entry points do,
    after importing torch), numba's are frozen too (a full pass over them costs ~0.25 s on 2 cores). A
    failure here is ignored: the real call raises it with its context."""
    import gc
    import threading

    dev = torch.device(device)
    if dev.type == "cuda":
        def warm() -> None:
            from engine import timeline

            try:
                torch.empty(1, device=dev)
                torch.empty(1, pin_memory=True)
                timeline.mark("cuda_ready")
                if target == "nvfp4":  # import Triton, load (or compile) the fused kernel's specializations:
                    one = torch.tensor(1.0)  # column tiles a multiple of 16 or not ([2048, 7168] and [7168, 2048])
                    for i in (1024, 2048):
                        w = torch.zeros(128, i, dtype=torch.float8_e4m3fn, device=dev)
                        s = torch.ones(1, i // 128, device=dev)
                        dispatch.fp8_block_amax(w, s, str(dev), block=(128, 128))
                        dispatch.fp8_block_to_nvfp4(w, s, one, str(dev), block=(128, 128))
                    timeline.mark("cuda_kernels_ready")
            except Exception:  # noqa: BLE001
                pass
    elif target == "nvfp4":
        def warm() -> None:
            try:
                w = torch.zeros(16, 32, dtype=torch.float8_e4m3fn)
                s, one = torch.ones(1, 1), torch.tensor(1.0)
                dispatch.fp8_block_amax(w, s, "cpu", block=(128, 128))
                dispatch.fp8_block_to_nvfp4(w, s, one, "cpu", block=(128, 128))
                dispatch.bf16_to_nvfp4(torch.zeros(16, 32, dtype=torch.bfloat16), one, "cpu")
            except Exception:  # noqa: BLE001
                pass
            if gc.get_freeze_count():
                gc.freeze()
    else:
        return
    t = threading.Thread(target=warm, name="convert-warm-up", daemon=True)
    if not _WARMING:
        atexit.register(_join_warm_ups)
    t.start()
    _WARMING[:] = [w for w in _WARMING if w[1].is_alive()] + [(dev.type, t)]


def _join_warm_ups() -> None:
    """At exit (an error can end the run within a second): wait for a warm-up still inside numba or CUDA. A daemon
    thread left running native code while the interpreter tears down aborts the process ("terminate called
    without an active exception", exit code 134) after the real error was printed."""
    for _, t in list(_WARMING):
        t.join(timeout=60)
