"""modelopt's max calibration without three host syncs per quantizer call.

`MaxCalibrator.collect` checks every batch's amax for NaN, negative and inf values with three
`assert torch.any(...)`: three device-to-host synchronizations per quantizer call. In a fused-MoE
layer that is 12 per expert per batch (gate_up and down, input and weight), so on a GPU the small
expert kernels wait on the host most of the time. `deferred_checks()` swaps in a `collect` that runs
the very same tensor operations in the same order (so the running max, and every amax, is bit-for-bit
modelopt's) without the checks; `check_amax` then does them once per layer, on the final amax, and
names the quantizer. The swap applies only to the modelopt `collect` it was written against (checked
by a digest of its source); any other version keeps modelopt's own.

`WeightsOnce`: in calibration mode a weight quantizer collects the amax of the same weight on every batch
(in a fused-MoE layer, two per expert per batch); once its calibrator holds that amax, the running max can
only stay equal, so the quantizer is bypassed (`disable()`) for the rest of the forward loop and enabled again
before modelopt loads the amax: the same amax, without ~2 quantizer calls per expert per batch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
from typing import Iterator

import torch

from engine.core.errors import ValidationFailedError

# sha256[:16] of inspect.getsource(MaxCalibrator.collect) in the modelopt releases this mirrors (0.47)
KNOWN_COLLECT = {"0ec3cd8409470bc6"}


_QU = None  # modelopt.torch.quantization.utils, bound by deferred_checks (no import statement per call)


@torch.no_grad()
def _collect(self, x):
    quant_utils = _QU
    reduce_axis = quant_utils.convert_quantization_axis_to_reduce_axis(x, self._axis)
    local_amax = quant_utils.reduce_amax(x, axis=reduce_axis).detach()
    if x.device.type == "meta":
        self._calib_amax = local_amax
        return
    if self._calib_amax is None:
        self._calib_amax = local_amax
    else:
        if local_amax.shape != self._calib_amax.shape:
            raise RuntimeError("amax shape changed!")
        self._calib_amax = torch.max(self._calib_amax, local_amax)
    if self._track_amax:
        self._amaxs.append(local_amax.cpu().numpy())


@functools.lru_cache(maxsize=1)
def supported() -> bool:
    from modelopt.torch.quantization.calib.max import MaxCalibrator

    try:
        src = inspect.getsource(MaxCalibrator.collect)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(src.encode()).hexdigest()[:16] in KNOWN_COLLECT


@contextlib.contextmanager
def deferred_checks() -> Iterator[bool]:
    """Within: modelopt's MaxCalibrator.collect without per-call syncs (yields whether it was swapped)."""
    global _QU
    from modelopt.torch.quantization import utils as quant_utils
    from modelopt.torch.quantization.calib.max import MaxCalibrator

    if not supported():
        yield False
        return
    _QU = quant_utils
    orig = MaxCalibrator.__dict__["collect"]
    MaxCalibrator.collect = _collect
    try:
        yield True
    finally:
        MaxCalibrator.collect = orig


def check_amax(amax: dict[str, torch.Tensor]) -> None:
    """What modelopt asserts per batch, once on the result: every amax finite and >= 0."""
    if not amax:
        return
    keys = list(amax)
    flat = torch.stack([amax[k].detach().float().reshape(-1).nan_to_num(nan=-1.0, posinf=-1.0, neginf=-1.0).min()
                        for k in keys]).cpu()
    bad = [k for k, v in zip(keys, flat.tolist(), strict=True) if not (math.isfinite(v) and v >= 0)]
    if bad:
        raise ValidationFailedError(f"calibration gave a NaN, infinite or negative amax for {len(bad)} quantizer(s), "
                                    f"e.g. {bad[:3]}", at=bad[0],
                                    hint="the model produced non-finite activations on these samples; check the "
                                         "checkpoint (dequantization, dtype) and the samples")


def _is_weight_quantizer(name: str) -> bool:
    parts = name.split(".")
    return parts[-1].endswith("weight_quantizer") or (len(parts) > 1 and parts[-2].endswith("weight_quantizers"))


class WeightsOnce:
    """Within a calibration forward loop over `root`: `after_batch()` bypasses every weight quantizer whose
    calibrator has its amax; `restore()` enables them again (see the module doc)."""

    def __init__(self, root: torch.nn.Module):
        from modelopt.torch.quantization.nn import TensorQuantizer

        self.waiting = [m for n, m in root.named_modules() if isinstance(m, TensorQuantizer) and _is_weight_quantizer(n)
                        and not m._disabled and m._if_calib and getattr(m, "_calibrator", None) is not None]
        self.bypassed: list = []

    def after_batch(self) -> None:
        still = []
        for q in self.waiting:
            if getattr(q._calibrator, "_calib_amax", None) is not None:
                q.disable()
                self.bypassed.append(q)
            else:  # e.g. an expert no token reached yet
                still.append(q)
        self.waiting = still

    def restore(self) -> None:
        for q in self.bypassed:
            q.enable()
        self.bypassed.clear()
