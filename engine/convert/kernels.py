"""The converter's hot loops for torch tensors, delegated to the format kernels (engine.formats.nvfp4.dispatch:
C (else numba) on CPU, Triton or torch on CUDA; bytes identical to the torch reference). Results are CPU tensors.
The torch-free CPU path calls the same CPU kernels through engine.formats.nvfp4.host. torch is imported on first
use.

Why compiled kernels on CPU: on 2 cores the bit-exact vectorized torch path measured ~38 MB/s of FP8 input (the
speed of `fp8_to_nvfp4_streaming.py`), while one fused kernel (dequant + block amax + E2M1 rounding + packing in
one pass, no temporaries) runs at 600-1300 MB/s: the conversion becomes I/O bound. Why C first:
engine.formats.native.build.
"""

from __future__ import annotations

import atexit
from contextlib import nullcontext

from engine.core import timeline
from engine.formats import cpu_kernels
from engine.formats.fp8_block import host as fb
from engine.formats.kernel_mode import serial_kernels
from engine.formats.nvfp4 import host


def _dev(device) -> str:
    return str(device)  # "cpu", "cuda", "cuda:N" (a torch.device prints the same)


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


def fp8_block_amax(w, scale, block: tuple[int, int], device="cpu"):
    """max |fp32(code) · scale| of an FP8-block weight, without materializing it."""
    from engine.formats.nvfp4 import dispatch

    return dispatch.fp8_block_amax(w, scale, _after_cuda_warm_up(_dev(device)), block=block)


def fp8_block_to_nvfp4(w, scale, block: tuple[int, int], scale_2, device="cpu"):
    """(packed uint8, block_scale e4m3) of an FP8-block weight quantized with `scale_2` (fused, one pass)."""
    from engine.formats.nvfp4 import dispatch

    return dispatch.fp8_block_to_nvfp4(w, scale, scale_2, _after_cuda_warm_up(_dev(device)), block=block)


def float_to_nvfp4(w, scale_2, device="cpu"):
    """(packed uint8, block_scale e4m3) of a 2-D float weight."""
    from engine.formats.nvfp4 import dispatch

    return dispatch.bf16_to_nvfp4(w, scale_2, _dev(device))


def warm_up(target: str, device) -> None:
    """Get the slow one-time set-ups going on a background thread, so that they overlap planning and the
    first reads instead of stalling the first tensor: on CPU, load the C kernels (built once per machine,
    engine.formats.native.build), or where they cannot be built import numba and load its cached kernels
    (~0.8 s on 2 cores, 2.5 s on a cold 16-core box); on CUDA, create the device context (and the pinned-memory
    allocator), import Triton and load its fused kernel (up to ~1-2 s, which the first FP8 item otherwise waits
    for). Where the process froze its objects out of the garbage collector's full passes (the converter's entry
    points do, after their imports), numba's are frozen too (a full pass over them costs ~0.25 s on 2 cores). A
    failure here is ignored: the real call raises it with its context."""
    import gc
    import threading

    kind = str(device).split(":", 1)[0]
    if kind == "cuda":
        def warm() -> None:
            try:
                import torch

                from engine.formats.nvfp4 import dispatch

                dev = torch.device(device)
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
    elif target in ("nvfp4", "bf16"):
        def warm() -> None:
            try:
                if cpu_kernels.backend() == "numba":  # no C compiler: import numba and load its cached kernels
                    _warm_numba()
                timeline.mark("cpu_kernels_ready")
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
    _WARMING[:] = [w for w in _WARMING if w[1].is_alive()] + [(kind, t)]


def _warm_numba() -> None:
    """Load the numba kernels the CPU converter calls: the parallel ones and their serial twins."""
    import numpy as np

    w, s = np.zeros((16, 32), np.uint8), np.ones((1, 1), np.float32)
    for serial in (False, True):  # the parallel kernels and their serial twins (engine.convert.pipeline)
        with serial_kernels() if serial else nullcontext():
            host.fp8_block_amax(w, s, (128, 128))
            host.fp8_block_to_nvfp4(w, s, (128, 128), 1.0)
            host.float_to_nvfp4(np.zeros((16, 32), np.float32), 1.0)
            fb.dequant_bf16(w, s, (128, 128))


def _join_warm_ups() -> None:
    """At exit (an error can end the run within a second): wait for a warm-up still inside numba or CUDA. A daemon
    thread left running native code while the interpreter tears down aborts the process ("terminate called
    without an active exception", exit code 134) after the real error was printed."""
    for _, t in list(_WARMING):
        t.join(timeout=60)
