"""Read a sharded safetensors checkpoint one tensor at a time, knowing every dtype and shape up front.

`CheckpointReader(dir)` maps every tensor to its shard through `model.safetensors.index.json` (or a lone
`model.safetensors`), parses each shard's header only (8-byte length + JSON), and reads a tensor's bytes
with one positioned read into a fresh buffer: no mmap, so the page cache never counts as our memory and
peak RSS is the tensors in hand. Every error names the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from engine.checkpoint import safetensors_format
from engine.checkpoint.consistency import config_disagreements
from engine.checkpoint.host import HostArray
from engine.checkpoint.safetensors_format import ITEMSIZE, parse_header
from engine.core.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor lives and what it is, known without reading its data."""

    name: str
    dtype_name: str  # safetensors spelling, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    shard: str  # file name inside the checkpoint dir
    start: int  # absolute byte offset in the shard
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype(self):
        """The torch dtype (imports torch)."""
        return safetensors_format.DTYPES[self.dtype_name]  # the module's __getattr__ imports torch

    def __iter__(self):  # so `dtype, shape, shard = reader.meta(name)` works
        return iter((self.dtype, self.shape, self.shard))


class _ThreadFiles(dict):
    """One thread's open shard files (shard -> descriptor). `close()` closes the calling thread's; a reading thread
    that ends first (a pool's worker) takes its own along when its threading.local entry goes, instead of leaving
    them open for the life of the process."""

    def __del__(self) -> None:
        for fd in self.values():
            try:
                os.close(fd)
            except OSError:
                pass


class CheckpointReader:
    """A checkpoint directory: `.names()`, `.meta(name)`, `.get(name)`, `.config`, `.fingerprint()`.

    strict=True (the default) raises on the first inconsistency between index and shards, or between config.json
    and the tensors; strict=False records the former in `.problems` (what `inspect` reports as anomalies) and
    reads what it can. `weight_map` (tensor -> shard) stands in for the index: the finished shards of a checkpoint
    still being written, as its manifest lists them.
    """

    def __init__(self, path: str | os.PathLike, strict: bool = True, weight_map: dict[str, str] | None = None):
        self.dir = Path(path)
        self.strict = strict
        self.problems: list[CheckpointError] = []
        self._metas: dict[str, TensorMeta] = {}
        self._shard_sizes: dict[str, int] = {}
        self._config: dict | None = None
        self._local = threading.local()
        if not self.dir.is_dir():
            raise CheckpointError(f"checkpoint directory {self.dir} does not exist", at=str(self.dir),
                                  hint="check the --src path")
        self.index_path: Path | None = None
        if weight_map is None:
            weight_map = self._load_weight_map()
        self._scan(weight_map)
        if strict and (config_problems := self.config_problems()):
            raise config_problems[0]

    # -- loading -------------------------------------------------------------------------------------
    def _load_weight_map(self) -> dict[str, str] | None:
        idx = self.dir / INDEX_NAME
        if idx.exists():
            self.index_path = idx
            try:
                obj = json.loads(idx.read_text())
                weight_map = obj["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{idx} is not a valid index ({e})", at=str(idx),
                                      hint="re-download the index or rebuild it from the shards") from e
            return {str(k): str(v) for k, v in weight_map.items()}
        if (self.dir / SINGLE_NAME).exists():
            return None
        others = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if others:
            raise CheckpointError(
                f"index missing: {idx} not found, but the directory holds {len(others)} shard(s) "
                f"({', '.join(others[:3])}{', …' if len(others) > 3 else ''})",
                at=str(idx), hint="copy model.safetensors.index.json from the source repository")
        raise CheckpointError(f"no safetensors checkpoint in {self.dir}: neither {INDEX_NAME} nor {SINGLE_NAME}",
                              at=str(self.dir), hint="point at the directory holding the model's shards")

    def _problem(self, err: CheckpointError) -> None:
        if self.strict:
            raise err
        self.problems.append(err)

    def _scan(self, weight_map: dict[str, str] | None) -> None:
        if weight_map is None:
            shards = [SINGLE_NAME]
        else:
            shards = sorted(set(weight_map.values()))
        listed_in: dict[str, set[str]] = {}
        if weight_map is not None:
            for name, shard in weight_map.items():
                listed_in.setdefault(shard, set()).add(name)
        for shard in shards:
            path = self.dir / shard
            if not path.exists():
                names = sorted(listed_in.get(shard, ()))
                self._problem(CheckpointError(
                    f"shard missing: {path} is listed in the index for {len(names)} tensor(s) "
                    f"(first: {names[0] if names else '?'}) but does not exist",
                    at=str(path), hint="the download is incomplete; fetch that shard again"))
                continue
            header = self._read_header(path)
            if header is None:
                continue
            metas = self._metas_of(path, header)
            present = set(metas)
            if weight_map is not None:
                for name in sorted(listed_in.get(shard, set()) - present):
                    self._problem(CheckpointError(
                        f"tensor listed but absent: the index puts {name} in {shard}, whose header lacks it",
                        at=f"{path}:{name}", hint="the index and shards disagree; re-download both"))
            for name, meta in metas.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    where = weight_map.get(name)
                    self._problem(CheckpointError(
                        f"tensor present but unlisted: {shard} holds {name}, which the index "
                        + (f"maps to {where}" if where else "does not list"),
                        at=f"{path}:{name}", hint="rebuild model.safetensors.index.json from the shards"))
                    if where is not None:
                        continue
                self._metas[name] = meta

    def _read_header(self, path: Path) -> dict | None:
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                header, data_start = parse_header(fh, str(path))
        except (OSError, ValueError) as e:
            self._problem(CheckpointError(f"cannot read shard header: {e}", at=str(path),
                                          hint="the file is damaged or not safetensors; fetch it again"))
            return None
        self._shard_sizes[path.name] = size
        header["__data_start__"] = data_start
        return header

    def _metas_of(self, path: Path, header: dict) -> dict[str, TensorMeta]:
        data_start = header.pop("__data_start__")
        header.pop("__metadata__", None)
        size = self._shard_sizes[path.name]
        out: dict[str, TensorMeta] = {}
        for name, info in header.items():
            try:
                dt = str(info["dtype"])
                shape = tuple(int(d) for d in info["shape"])
                a, b = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as e:
                self._problem(CheckpointError(f"malformed header entry for {name} in {path.name} ({e})",
                                              at=f"{path}:{name}", hint="the shard is damaged; fetch it again"))
                continue
            if dt not in ITEMSIZE:
                self._problem(CheckpointError(
                    f"unsupported dtype {dt} for {name} in {path.name}",
                    at=f"{path}:{name}",
                    hint=f"quantdeck reads {', '.join(sorted(ITEMSIZE))}; convert that tensor first"))
                continue
            n = ITEMSIZE[dt]
            for d in shape:
                n *= d
            if b - a != n or data_start + b > size:
                self._problem(CheckpointError(
                    f"{name} in {path.name}: offsets [{a}, {b}) do not fit {dt}{list(shape)} in a "
                    f"{size}-byte file", at=f"{path}:{name}", hint="the shard is truncated; fetch it again"))
                continue
            out[name] = TensorMeta(name, dt, shape, path.name, data_start + a, data_start + b)
        return out

    def config_problems(self) -> list[CheckpointError]:
        """Where config.json and the tensors disagree (layers present, embedding width); a strict reader raises
        the first, so convert and calibrate refuse such a checkpoint before any work. A config.json that does not
        parse is left to `.config`, which says so when it is needed."""
        try:
            config = self.config
        except CheckpointError:
            return []
        return config_disagreements(config, self._metas, str(self.dir / "config.json"))

    # -- queries -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._metas)

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def __len__(self) -> int:
        return len(self._metas)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._metas[name]
        except KeyError:
            raise CheckpointError(f"no tensor named {name} in {self.dir}", at=f"{self.dir}:{name}",
                                  hint="`quantdeck inspect` lists the tensors") from None

    def shards(self) -> list[str]:
        return sorted(self._shard_sizes)

    def shard_size(self, shard: str) -> int:
        return self._shard_sizes[shard]

    def names_in(self, shard: str) -> list[str]:
        return sorted(n for n, m in self._metas.items() if m.shard == shard)

    @property
    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self._metas.values())

    @property
    def config(self) -> dict:
        """config.json as a dict ({} when absent)."""
        if self._config is None:
            p = self.dir / "config.json"
            try:
                self._config = json.loads(p.read_text()) if p.exists() else {}
            except ValueError as e:
                raise CheckpointError(f"{p} is not valid JSON ({e})", at=str(p),
                                      hint="fix or re-download config.json") from e
        return self._config

    def fingerprint(self) -> str:
        """A digest of what the checkpoint holds (names, dtypes, shapes, shard sizes, config): stable across
        copies (no mtimes), different when any tensor's place or size changes."""
        h = hashlib.sha256()
        for name in self.names():
            m = self._metas[name]
            h.update(f"{name}|{m.dtype_name}|{m.shape}|{m.shard}|{m.start}|{m.end}\n".encode())
        for shard in self.shards():
            h.update(f"{shard}={self._shard_sizes[shard]}\n".encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        return h.hexdigest()[:32]

    # -- data ----------------------------------------------------------------------------------------
    def _fd(self, shard: str) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None:
            fds = self._local.fds = _ThreadFiles()
        fd = fds.get(shard)
        if fd is None:
            if len(fds) >= 16:
                os.close(fds.pop(next(iter(fds))))
            path = self.dir / shard
            try:
                fd = fds[shard] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"cannot open {path}: {e.strerror}", at=str(path),
                                      hint="check the file exists and is readable") from e
            try:  # reads mostly sweep forward: a larger kernel readahead window
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (OSError, AttributeError):  # pragma: no cover - not Linux
                pass
        return fd

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading `name` into the page cache now (asynchronous; a hint only)."""
        m = self.meta(name)
        try:
            os.posix_fadvise(self._fd(m.shard), m.start, m.nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # pragma: no cover - not Linux
            pass

    def _read_into(self, m: TensorMeta, view: memoryview) -> None:
        fd = self._fd(m.shard)
        got = 0
        while got < m.nbytes:
            n = os.preadv(fd, [view[got:]], m.start + got)
            if n <= 0:
                raise CheckpointError(f"{m.name}: {m.shard} ended early at byte {m.start + got}",
                                      at=f"{self.dir / m.shard}:{m.name}", hint="the shard is truncated")
            got += n

    def read_range(self, shard: str, offset: int, view: memoryview, what: str) -> int:
        """Fill `view` with the bytes of `shard` from `offset` (positioned reads: threads may share the reader);
        `what` names the tensors there in the error a short read raises. Returns the bytes read."""
        fd = self._fd(shard)
        got, n = 0, len(view)
        while got < n:
            k = os.preadv(fd, [view[got:]], offset + got)
            if k <= 0:
                raise CheckpointError(f"{shard} ended early at byte {offset + got} while reading {what}",
                                      at=f"{self.dir / shard}:{what}", hint="the shard is truncated; fetch it again")
            got += k
        return got

    def read_bytes(self, name: str, pin: bool = False):
        """The raw bytes of a tensor as a uint8 torch tensor (a private copy, not a mapping); `pin` puts them
        in page-locked memory for a fast asynchronous upload to a GPU."""
        import torch

        m = self.meta(name)
        buf = torch.empty(m.nbytes, dtype=torch.uint8, pin_memory=pin)
        if m.nbytes:
            self._read_into(m, memoryview(buf.numpy()).cast("B"))
        return buf

    def get(self, name: str, pin: bool = False):
        """One tensor as a torch tensor, on CPU (page-locked with `pin`), with its stored dtype and shape."""
        import torch

        m = self.meta(name)
        raw = self.read_bytes(name, pin=pin)
        if m.nbytes == 0:
            return torch.empty(m.shape, dtype=m.dtype)
        return raw.view(m.dtype).reshape(m.shape)

    def get_host(self, name: str) -> HostArray:
        """One tensor as a HostArray (numpy storage; no torch), read into a private buffer."""
        m = self.meta(name)
        buf = np.empty(m.nbytes, np.uint8)
        if m.nbytes:
            self._read_into(m, memoryview(buf))
        return HostArray.from_bytes(m.dtype_name, m.shape, buf)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        for name in names if names is not None else self.names():
            yield name, self.get(name)

    def close(self) -> None:
        fds = getattr(self._local, "fds", None) or {}
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
