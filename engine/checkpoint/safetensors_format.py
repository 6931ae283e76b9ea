"""The safetensors file format, byte for byte as the `safetensors` library writes it.

A file is: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces to a multiple
of 8), then the tensor data. safetensors orders tensors by dtype rank (largest first, the order below),
then by name, lays the data out back to back in that order, and writes `__metadata__` first. Writing our
headers with the same rules keeps our shards byte-identical to `safetensors.torch.save_file`'s.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

# Bytes per element of every safetensors dtype quantdeck reads (no torch: the planner and the CPU converter
# run without it).
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1,
}

# Largest rank first, as measured against safetensors 0.8's writer (tests re-check it).
RANK_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
              "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
_RANK = {name: i for i, name in enumerate(RANK_ORDER)}
_TORCH: dict[str, dict] = {}


def _torch_tables() -> dict[str, dict]:
    """DTYPES (safetensors name -> torch dtype) and NAMES (its inverse), built on first use."""
    if not _TORCH:
        import torch

        dtypes = {
            "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
            "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
            "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
            "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
        }
        _TORCH.update({"DTYPES": dtypes, "NAMES": {v: k for k, v in dtypes.items()}})  # both at once
    return _TORCH


def __getattr__(name: str):  # DTYPES / NAMES import torch only when asked for
    if name in ("DTYPES", "NAMES"):
        return _torch_tables()[name]
    raise AttributeError(name)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an output shard: name, safetensors dtype name, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def of(cls, name: str, dtype, shape) -> "TensorSpec":
        """From a torch dtype, or a safetensors dtype name (a HostArray's)."""
        return cls(name, dtype if isinstance(dtype, str) else dtype_name(dtype), tuple(int(d) for d in shape))


def dtype_name(dtype) -> str:
    """The safetensors name of a torch dtype."""
    return _torch_tables()["NAMES"][dtype]


def file_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The order safetensors lays tensors out in: dtype rank, then name."""
    return sorted(specs, key=lambda s: (_RANK.get(s.dtype, len(_RANK)), s.name))


@dataclass(frozen=True)
class ShardMap:
    """Where each tensor's bytes go in a file: header bytes plus absolute offsets."""

    header: bytes  # the 8-byte length prefix plus the padded JSON
    offsets: dict[str, tuple[int, int]]  # name -> (absolute start, absolute end)
    total_size: int  # the whole file's size in bytes

    @property
    def data_start(self) -> int:
        return len(self.header)


def build_shard_map(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> ShardMap:
    """The header and offsets safetensors would write for these tensors (data not needed)."""
    ordered = file_order(specs)
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    rel: dict[str, tuple[int, int]] = {}
    pos = 0
    for s in ordered:
        rel[s.name] = (pos, pos + s.nbytes)
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    base = len(head)
    return ShardMap(head, {k: (base + a, base + b) for k, (a, b) in rel.items()}, base + pos)


def parse_header(fh, path: str) -> tuple[dict, int]:
    """Read a safetensors header from an open binary file: (header dict, data start offset).

    Raises ValueError with a readable reason when the file is not a safetensors file.
    """
    fh.seek(0)
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise ValueError(f"{path} is shorter than a safetensors header")
    (n,) = struct.unpack("<Q", prefix)
    if n > 100 << 20:
        raise ValueError(f"{path} declares a {n}-byte header; not a safetensors file")
    raw = fh.read(n)
    if len(raw) < n:
        raise ValueError(f"{path} ends inside its header")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path} has a header that is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a header that is not a JSON object")
    return header, 8 + n
