"""Which device a conversion runs on, decided before torch is imported (a CPU run never imports it).

`--device auto` picks the CPU when there is no NVIDIA GPU, and also on a GPU machine with many cores for
NVFP4: there the conversion is bound by the disk, the CPU kernels outrun it, and a CUDA run first spends
seconds importing torch and loading its CUDA libraries (gigabytes read from disk on a cold machine).
Measured on an H100 machine (16 cores, 7.2 GB FP8 checkpoint): the NVFP4 kernels run at 4.5 GB/s on
the 16 cores, the disk reads at about 1.5 GB/s, and `import torch` took 3.3-5.8 s of a 10-14 s CUDA run.
FP8-block and BF16 targets (whose CPU math is torch's), sources whose math is mostly torch's (V4's MXFP4
experts), runs split over several processes (torchrun ranks, --workers) and machines with fewer cores (as this
process may use them) take the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.core.errors import UsageError
from engine.startup import cuda_preinit, readahead
from engine.startup.readahead import nvidia_gpu_present

AUTO_CPU_CORES = 8  # from this many cores, auto prefers the CPU kernels for NVFP4 (see the module doc)


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu", "cuda" or "cuda:N"
    reason: str  # why, for the log (auto only)
    asked: str  # what the operator asked for
    gpu: bool = False  # auto chose the CPU although an NVIDIA GPU is there (see `needs_gpu_after_all`)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a Slurm or container cpuset), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_device(device: str | None, target: str = "nvfp4", cores: int | None = None,
                  split: int = 1) -> DeviceChoice:
    """`device` as asked ("auto", "cpu", "cuda", "cuda:N") → the device to use. `split`: processes sharing
    the work (torchrun ranks, --workers): each of them gets a GPU of its own, so auto takes the GPUs. Whether
    torch sees the GPU is checked later, by the CUDA path itself (engine.convert.streaming)."""
    asked = str(device or "auto").strip().lower()
    if asked == "cpu" or asked == "cuda" or (asked.startswith("cuda:") and asked[5:].isdigit()):
        return DeviceChoice(asked, "asked for", asked)
    if asked != "auto":
        raise UsageError(f"unknown device {device!r}", at="--device", hint="auto, cpu, cuda or cuda:N")
    if not nvidia_gpu_present():
        return DeviceChoice("cpu", "no NVIDIA GPU", asked)
    cores = usable_cores() if cores is None else cores
    if target == "nvfp4" and cores >= AUTO_CPU_CORES and split <= 1:
        return DeviceChoice("cpu", f"{cores} cores run the NVFP4 kernels faster than a disk reads; "
                                   "--device cuda uses the GPU", asked, gpu=True)
    return DeviceChoice("cuda", "NVIDIA GPU present", asked)


TORCH_SHARE = 0.1  # auto moves to the GPU when more than this share of the source needs torch's math


def needs_gpu_after_all(choice: DeviceChoice, torch_bytes: int, total_bytes: int) -> bool:
    """Auto chose the CPU on a GPU machine, but the plan says much of the source goes through torch's math
    (V4's MXFP4 experts: ~75 MB/s on torch's CPU path against ~1 GB/s for the NVFP4 kernel on 2 cores):
    then the GPU is the better choice."""
    return choice.asked == "auto" and choice.gpu and total_bytes > 0 and torch_bytes > TORCH_SHARE * total_bytes


def start_early(src, device: str | None, target: str, entry: str | None = None) -> DeviceChoice | None:
    """What the entry points do before their heavy imports: idle OpenMP and OpenBLAS threads told to sleep or not
    to start (an explicit setting wins; read when torch, numba or numpy load their libraries, so only where none is
    loaded yet), the device chosen, then the source read ahead (engine.startup.readahead) and, for CUDA, the driver's
    context started (engine.startup.cuda_preinit). None (and nothing started) for a device that cannot be used: the
    conversion reports that error itself."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the converter's reader and writer threads need the cycles
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # no BLAS here: no pool of spinning OpenBLAS threads
    try:
        choice = choose_device(device, target)
    except UsageError:
        return None
    readahead.start(src, choice.device, cpu_ok=usable_cores() >= AUTO_CPU_CORES, entry=entry)
    cuda_preinit.start(choice.device)
    return choice
