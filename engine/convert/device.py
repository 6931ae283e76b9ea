"""Which device a conversion runs on, decided before torch is imported (a CPU run never imports it).

`--device auto` picks the CPU when there is no NVIDIA GPU, and also on a GPU machine with many cores for
NVFP4: there the conversion is bound by the disk, the CPU kernels outrun it, and a CUDA run first spends
seconds importing torch and loading its CUDA libraries (gigabytes read from disk on a cold machine).
Measured on a lent H100 machine (16 cores, 7.2 GB FP8 checkpoint): the NVFP4 kernels run at 4.5 GB/s on
the 16 cores, the disk reads at about 1.5 GB/s, and `import torch` took 3.3-5.8 s of a 10-14 s CUDA run.
FP8-block and BF16 targets (whose CPU math is torch's) and machines with fewer cores take the GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from engine.errors import UsageError

AUTO_CPU_CORES = 8  # from this many cores, auto prefers the CPU kernels for NVFP4 (see the module doc)


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu", "cuda" or "cuda:N"
    reason: str  # why, for the log (auto only)
    asked: str  # what the operator asked for


def nvidia_gpu_present() -> bool:
    """An NVIDIA driver with at least one GPU (asked of the driver's files, not of torch)."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return os.path.exists("/dev/nvidia0")


def choose_device(device: str | None, target: str = "nvfp4", cores: int | None = None) -> DeviceChoice:
    """`device` as asked ("auto", "cpu", "cuda", "cuda:N") → the device to use. Whether torch sees the GPU
    is checked later, by the CUDA path itself (engine.convert.streaming)."""
    asked = str(device or "auto").strip().lower()
    if asked == "cpu" or asked == "cuda" or (asked.startswith("cuda:") and asked[5:].isdigit()):
        return DeviceChoice(asked, "asked for", asked)
    if asked != "auto":
        raise UsageError(f"unknown device {device!r}", at="--device", hint="auto, cpu, cuda or cuda:N")
    if not nvidia_gpu_present():
        return DeviceChoice("cpu", "no NVIDIA GPU", asked)
    cores = (os.cpu_count() or 1) if cores is None else cores
    if target == "nvfp4" and cores >= AUTO_CPU_CORES:
        return DeviceChoice("cpu", f"{cores} cores run the NVFP4 kernels faster than a disk reads; "
                                   "--device cuda uses the GPU", asked)
    return DeviceChoice("cuda", "NVIDIA GPU present", asked)


def start_early(src, device: str | None, target: str) -> DeviceChoice | None:
    """What the entry points do before their heavy imports: choose the device, then start reading the source
    ahead (engine.readahead) and, for CUDA, the driver's context (engine.cuda_preinit). None (and nothing
    started) for a device that cannot be used: the conversion reports that error itself."""
    from engine import cuda_preinit, readahead

    try:
        choice = choose_device(device, target)
    except UsageError:
        return None
    readahead.start(src, choice.device, cpu_ok=(os.cpu_count() or 1) >= AUTO_CPU_CORES)
    cuda_preinit.start(choice.device)
    return choice
