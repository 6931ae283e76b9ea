"""`HostArray`: a tensor held in host memory without torch — its safetensors dtype name and a numpy array of
its storage (FP8 and E8M0 as uint8, BF16 as uint16), shaped as the tensor.

The CPU converter reads, computes and writes these, so a CPU conversion never imports torch (whose import
is seconds of a short run, and on a cold machine gigabytes of shared libraries read from disk). `.torch()`
gives the same bytes as a torch tensor, without a copy, for the few steps that still use torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.checkpoint import safetensors_format

# safetensors dtype name -> numpy storage dtype (same item size)
STORAGE: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(np.uint8), "F8_E5M2": np.dtype(np.uint8), "F8_E8M0": np.dtype(np.uint8),
    "F8_E4M3FNUZ": np.dtype(np.uint8), "F8_E5M2FNUZ": np.dtype(np.uint8),
}


@dataclass(frozen=True)
class HostArray:
    """One tensor: `dtype` (safetensors name, e.g. "F8_E4M3") and `data` (numpy storage, C-contiguous)."""

    dtype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def raw(self) -> np.ndarray:
        """The bytes, flat uint8 (no copy)."""
        return np.ascontiguousarray(self.data).reshape(-1).view(np.uint8)

    def torch(self):
        """The same tensor as torch sees it (shares memory; imports torch)."""
        import torch

        t = torch.from_numpy(np.ascontiguousarray(self.data).reshape(-1).view(np.uint8))
        return t.view(safetensors_format.DTYPES[self.dtype]).reshape(self.shape)

    @classmethod
    def from_bytes(cls, dtype: str, shape: tuple[int, ...], buf: np.ndarray) -> "HostArray":
        """`buf` (flat uint8, exactly the tensor's bytes) viewed as the tensor."""
        return cls(dtype, buf.view(STORAGE[dtype]).reshape(shape))

    @classmethod
    def of(cls, dtype: str, data: np.ndarray) -> "HostArray":
        if np.dtype(data.dtype) != STORAGE[dtype]:
            raise TypeError(f"{dtype} is stored as {STORAGE[dtype]}, not {data.dtype}")
        return cls(dtype, np.ascontiguousarray(data))
