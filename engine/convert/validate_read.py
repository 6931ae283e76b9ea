"""validate's host path: the bytes of the checkpoints read once, on threads, and decoded with numpy — no torch.

Every tensor of the output is read whole, once, with one positioned read, and hashed as it arrives (the manifest's
pieces digest, engine.checkpoint.digest, is a digest over each tensor's own sha256, so no shard is read a second
time for its checksum). Of the source, only what validate compares is read: the sampled rows of each quantized
weight (with its small scale grid) and the tensors kept as they are. Reads, hashing and numpy release the GIL, so a
pool of threads keeps the disk and every core busy.

The decoders here give the float32 values of the torch references bit for bit (engine.formats.nvfp4.helpers
`dequant_nvfp4`, engine.formats.fp8_block.helpers `dequant_fp8_block`): a product of two float32 values is one
correctly rounded multiplication in either library. What they do not cover (MXFP4, scales in unusual dtypes,
malformed tensors) raises `Unsupported`, and validate takes the torch reference path for that module, so its
findings and their messages stay those of the reference.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from engine.checkpoint.digest import KIND, combine, hash_fd_range, matches, pieces_of
from engine.checkpoint.reader import CheckpointReader
from engine.formats.native import calls as native_calls
from engine.formats.nvfp4.host import E4M3_LUT

SAMPLE_ROWS = 256
READ_CHUNK = 64 << 20  # one pread at most this long (the kernel splits larger ones anyway)
PAGE = 4096  # the page cache's unit: a row read alone costs its pages
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_E2M1 = np.array((0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0), np.float32)
_BYTES = np.arange(256)
PAIR_LUT = np.ascontiguousarray(np.stack([_E2M1[_BYTES & 0xF], _E2M1[_BYTES >> 4]], axis=1))  # byte -> 2 values
ABS_E4M3 = np.abs(E4M3_LUT)


class Unsupported(Exception):
    """The host path does not decode this tensor: validate uses the torch reference for it."""


def sample_rows(n: int) -> np.ndarray:
    """The rows validate compares: all of them up to SAMPLE_ROWS, else SAMPLE_ROWS evenly spaced ones (first and
    last included)."""
    if n <= SAMPLE_ROWS:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n - 1, SAMPLE_ROWS)).astype(np.int64))


def worker_count() -> int:
    """Reader threads: twice the cores (half of them wait on the disk at any time), at least 4, at most 32."""
    return max(4, min(32, 2 * (os.cpu_count() or 2)))


class Scratch:
    """Each thread's reusable buffers, by slot: a fresh large numpy array costs a page fault per 4 KiB when first
    written (a third of the time of a decode on a small VM); a buffer reused from one tensor to the next does not."""

    _tls = threading.local()

    @classmethod
    def get(cls, slot: str, shape: tuple[int, ...], dtype=np.uint8) -> np.ndarray:
        bufs = getattr(cls._tls, "bufs", None)
        if bufs is None:
            bufs = cls._tls.bufs = {}
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        buf = bufs.get(slot)
        if buf is None or buf.nbytes < n:
            buf = bufs[slot] = np.empty(max(n, 1 << 16), np.uint8)
        return buf[:n].view(dtype).reshape(shape)


class Files:
    """One read-only descriptor per file, shared by every thread (pread needs no position)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._random: set[int] = set()
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def random(self, fd: int) -> None:
        """Turn the kernel's readahead off for `fd` (once): sampled rows read one by one would otherwise pull in the
        pages between them, and validate would read every byte of a tensor it samples. Large reads are unaffected
        (a read brings in the pages it asks for)."""
        with self._lock:
            if fd in self._random:
                return
            self._random.add(fd)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        except (OSError, AttributeError):  # a filesystem or platform without it: readahead stays
            pass

    @staticmethod
    def will_need(fd: int, offsets: list[int], length: int) -> None:
        """Ask the kernel for the ranges [offset, offset + length) now (POSIX_FADV_WILLNEED queues their reads
        without waiting): the disk then works on all of a tensor's sampled rows at once, where reading them one by
        one waits for each in turn (on a cold disk, sampled rows read row by row cost twice as long)."""
        try:
            for off in offsets:
                os.posix_fadvise(fd, off, length, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # a filesystem or platform without it: the reads still come, one by one
            pass

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._random.clear()


def _pread_into(fd: int, buf: np.ndarray, offset: int, what: str) -> None:
    view = memoryview(buf).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got: got + READ_CHUNK]], offset + got)
        if n <= 0:
            raise Unsupported(f"{what}: the file ended early")
        got += n


class Digests:
    """The sha256 of each piece of the output's shards, recorded as the pieces are read (thread-safe)."""

    def __init__(self) -> None:
        self._d: dict[tuple[str, int, int], bytes] = {}
        self._lock = threading.Lock()

    def add(self, shard: str, start: int, end: int, data: np.ndarray) -> None:
        d = hashlib.sha256(memoryview(data).cast("B")).digest()
        with self._lock:
            self._d[(shard, start, end)] = d

    def pieces(self, keys) -> dict[tuple[str, int, int], bytes]:
        """The digests recorded of the pieces `keys` ((shard, start, end)), those there are."""
        with self._lock:
            return {k: self._d[k] for k in keys if k in self._d}

    def update(self, pieces: dict[tuple[str, int, int], bytes]) -> None:
        """Pieces' digests recorded elsewhere (an earlier pass over the same bytes)."""
        with self._lock:
            self._d.update(pieces)

    def shard_digest(self, path: Path, files: Files) -> str:
        """The pieces digest of shard `path` ("" if it is not safetensors), hashing from disk only the pieces that
        no check read (the header, and bytes no tensor of the index owns)."""
        try:
            pieces = pieces_of(path)
        except (OSError, ValueError, KeyError, TypeError):
            return ""
        out = []
        for a, b in pieces:
            d = self._d.get((path.name, a, b))
            if d is None:
                d = hash_fd_range(files.fd(path), a, b, READ_CHUNK)
            out.append(d)
        return combine(out)

    def matches(self, path: Path, rec: dict, files: Files) -> bool:
        """engine.checkpoint.digest.matches, from the digests recorded here."""
        try:
            if not path.exists() or ("size" in rec and path.stat().st_size != rec["size"]):
                return False
        except OSError:
            return False
        if rec.get("digest"):
            return rec.get("digest_kind", KIND) == KIND and self.shard_digest(path, files) == rec["digest"]
        return matches(path, rec)  # a plain sha256 (older manifests): the file read once more


class HostReader:
    """Reads tensors of one checkpoint as numpy bytes: whole (hashed into `digests` when given) or sampled rows."""

    def __init__(self, reader: CheckpointReader, files: Files, digests: Digests | None = None):
        self.r = reader
        self.files = files
        self.digests = digests

    def full(self, name: str, slot: str | None = None) -> np.ndarray:
        """The tensor's bytes, flat uint8 (in this thread's scratch buffer `slot`, valid until its next use)."""
        m = self.r.meta(name)
        buf = Scratch.get(slot, (m.nbytes,)) if slot else np.empty(m.nbytes, np.uint8)
        if m.nbytes:
            _pread_into(self.files.fd(self.r.dir / m.shard), buf, m.start, name)
        if self.digests is not None:
            self.digests.add(m.shard, m.start, m.end, buf)
        return buf

    def rows(self, name: str, rows: np.ndarray, slot: str | None = None) -> np.ndarray:
        """Rows `rows` (ascending) of a 2-D tensor, as uint8 [len(rows), bytes per row]; never hashed."""
        m = self.r.meta(name)
        if len(m.shape) != 2:
            raise Unsupported(f"{name} is not 2-D")
        n, per = m.shape[0], m.nbytes // max(1, m.shape[0])
        fd = self.files.fd(self.r.dir / m.shard)
        out = Scratch.get(slot, (len(rows), per)) if slot else np.empty((len(rows), per), np.uint8)
        if len(rows) == n:  # every row: one read
            if m.nbytes:
                _pread_into(fd, out, m.start, name)
            return out
        if 2 * len(rows) * (per // PAGE + 2) * PAGE > m.nbytes:  # the rows' pages are much of it: one large read
            whole = Scratch.get(f"{slot}-whole", (n, per)) if slot else np.empty((n, per), np.uint8)
            _pread_into(fd, whole, m.start, name)
            np.take(whole, rows, axis=0, out=out)
            return out
        self.files.random(fd)  # no readahead: only the sampled rows' pages come from the disk
        offsets = m.start + rows.astype(np.int64) * per
        lib = _native()
        if lib is not None:  # one call, the GIL released once (see `_native`)
            rc = native_calls.pread_rows(lib, fd, offsets, out, advise=True)
            if rc < 0:
                raise OSError(-rc, f"reading {name}: {os.strerror(-rc)}", str(self.r.dir / m.shard))
            if rc > 0:
                raise Unsupported(f"{name}: the file ended early")
            return out
        offs = offsets.tolist()
        self.files.will_need(fd, offs, per)
        for j, off in enumerate(offs):
            _pread_into(fd, out[j], off, name)
        return out


def _native():
    """The C kernels' library where it builds (engine.formats.native), else None. Its `qd_pread_rows` reads a
    tensor's sampled rows in one call: in Python each row's advice and read is a system call that gives up the GIL
    and waits to take it back, and with 32 threads that wait, not the read, was most of validate's time when the
    rows were already in the page cache (the run's validate, right after the convert that read them)."""
    from engine.formats.native import build

    try:
        return build.library()
    except build.BuildError:  # QUANTDECK_KERNELS=c where none builds: the conversion refuses; the rows read in Python
        return None


# -- decoders (bit-exact with the torch references) ------------------------------------------------------------------
def float32_values(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A float tensor's bytes as float32 values (`tensor.float()`)."""
    if dtype == "BF16":  # the bits in the high half of a float32: one pass into one new array
        return np.left_shift(data.view(np.uint16), 16, dtype=np.uint32).view(np.float32).reshape(shape)
    if dtype == "F32":
        return data.view(np.float32).reshape(shape)
    if dtype == "F16":
        return data.view(np.float16).astype(np.float32).reshape(shape)
    if dtype == "F64":
        return data.view(np.float64).astype(np.float32).reshape(shape)
    raise Unsupported(f"not a float tensor: {dtype}")


def all_finite(data: np.ndarray, dtype: str) -> bool:
    """No NaN or Inf among a float tensor's values (`torch.isfinite(t.float()).all()`)."""
    if dtype == "BF16":
        bits = data.view(np.uint16)
        lib = _native() if native_calls.bf16_finite_takes(bits) else None
        if lib is not None:  # one pass in C, where numpy makes three and two arrays of the tensor's size
            return native_calls.bf16_finite(lib, bits)
        return not bool(((bits & 0x7F80) == 0x7F80).any())
    if dtype == "F32":
        return bool(np.isfinite(data.view(np.float32)).all())
    if dtype == "F16":
        return bool(np.isfinite(data.view(np.float16)).all())
    if dtype == "F64":
        return bool(np.isfinite(data.view(np.float64).astype(np.float32)).all())
    raise Unsupported(f"not a float tensor: {dtype}")


def scale_values(data: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """FP8 block scales as float32 multipliers (`scale_to_fp32`); the E8M0 NaN byte is left to the reference."""
    if dtype == "F8_E8M0":
        b = data.reshape(shape)
        if (b == 255).any():
            raise Unsupported("E8M0 NaN byte")
        return np.ldexp(np.ones(shape, np.float32), b.astype(np.int32) - 127)
    if dtype in FLOAT_DTYPES:
        return float32_values(data, dtype, shape)
    raise Unsupported(f"block scales stored as {dtype}")


def fp8_values(codes: np.ndarray, rows: np.ndarray, scale32: np.ndarray | None, block: tuple[int, int] | None,
               cols: int, slot: str | None = None) -> np.ndarray:
    """float32 values of FP8 E4M3 rows `rows` of a weight ([k, cols] bytes), each multiplied by its tile's scale."""
    vals = Scratch.get(slot, codes.shape, np.float32) if slot else np.empty(codes.shape, np.float32)
    if scale32 is not None and codes.ndim == 2 and codes.shape[1] == cols:
        lib = _native()
        rows64 = np.ascontiguousarray(rows, np.int64)
        if lib is not None and native_calls.fp8_rows_takes(codes, rows64, scale32, block[0], block[1], E4M3_LUT, vals):
            # one pass in C, the same float32 product per value
            return native_calls.fp8_rows_f32(lib, codes, rows64, scale32, block[0], block[1], E4M3_LUT, vals)
    np.take(E4M3_LUT, codes, out=vals, mode="clip")  # byte indices: never out of range; "clip" skips the check
    if scale32 is None:
        return vals
    bo, bi = block
    s = scale32[rows // bo]  # [k, tiles across]
    if cols % bi == 0:
        v = vals.reshape(len(rows), cols // bi, bi)
        np.multiply(v, s[:, :, None], out=v)
        return vals
    full = cols // bi * bi
    if full:
        v = vals[:, :full].reshape(len(rows), cols // bi, bi)
        np.multiply(v, s[:, : cols // bi, None], out=v)
    vals[:, full:] *= s[:, -1:]
    return vals


def scan_e4m3(bs: np.ndarray) -> tuple[int, int, int]:
    """E4M3 block scales: (NaN bytes, bytes that are not a finite scale > 0: NaN, zero or negative, the largest
    magnitude byte b & 0x7F; 0 when there are none)."""
    lib = _native() if native_calls.e4m3_scan_takes(bs) else None
    if lib is not None:  # one pass in C, where numpy makes five over the array
        return native_calls.e4m3_scan(lib, bs)
    mag = Scratch.get("magnitude", bs.shape)
    np.bitwise_and(bs, 0x7F, out=mag)  # E4M3 magnitude bits: 0x7F is NaN, 0 is zero
    nan = int(np.count_nonzero(mag == 0x7F))
    bad = int(np.count_nonzero(mag == 0)) + int(np.count_nonzero(bs >= 0x80)) + nan \
        - int(np.count_nonzero(bs == 0xFF)) - int(np.count_nonzero(bs == 0x80))  # NaN, zero, negative
    return nan, bad, int(mag.max()) if mag.size else 0


_PAIR64 = PAIR_LUT.copy().view(np.uint64).reshape(-1)  # the two float32 values of a byte as one 8-byte item


def nvfp4_values(packed: np.ndarray, bs: np.ndarray, s2: np.float32, cols: int | None, rows: np.ndarray | None = None,
                 slot: str | None = None) -> np.ndarray:
    """float32 values of NVFP4 rows (`rows` of, or all): packed [o, p] bytes, E4M3 block-scale bytes [o, 2p/16],
    float32 scale_2; `cols` cuts the padding of the last 16-value block."""
    lib = _native() if packed.ndim == 2 else None
    if lib is not None:  # one pass in C over the rows where they lie, the same two float32 products per value
        k, p = (packed.shape[0] if rows is None else len(rows)), packed.shape[1]
        out = Scratch.get(slot, (k, 2 * p), np.float32) if slot else np.empty((k, 2 * p), np.float32)
        rows64 = None if rows is None else np.ascontiguousarray(rows, np.int64)
        if native_calls.nvfp4_rows_takes(packed, bs, rows64, E4M3_LUT, PAIR_LUT, out):
            native_calls.nvfp4_rows_f32(lib, packed, bs, s2, rows64, E4M3_LUT, PAIR_LUT, out)
            return out if cols is None or cols == 2 * p else out[:, :cols]
    if rows is not None:
        packed, bs = packed[rows], bs[rows]
    k, p = packed.shape
    nb = bs.shape[1]
    per_block = np.take(E4M3_LUT, bs, mode="clip")
    per_block *= np.float32(s2)
    pairs = Scratch.get(slot, (k, p), np.uint64) if slot else np.empty((k, p), np.uint64)
    np.take(_PAIR64, packed, out=pairs, mode="clip")
    vals = pairs.view(np.float32).reshape(k, nb, 16)
    np.multiply(vals, per_block[:, :, None], out=vals)
    vals = vals.reshape(k, 2 * p)
    return vals if cols is None or cols == 2 * p else vals[:, :cols]


def rel_error(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Σ(a-b)², Σb²) of two float32 arrays of one shape (`a` is overwritten with a-b)."""
    bb = np.ascontiguousarray(b).reshape(-1)
    ref = float(np.dot(bb, bb))
    np.subtract(a, b, out=a)
    d = a.reshape(-1)
    return float(np.dot(d, d)), ref
