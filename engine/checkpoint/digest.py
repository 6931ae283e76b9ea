"""The checksum of a written shard, computed while writing: sha256 over the sha256 of each piece.

A shard's bytes are its header, then each tensor's data. The writer gets tensors in any order (the file
is laid out by dtype, then name), so a plain sha256 of the file would need the whole file read back after
the last write. Instead each piece is hashed from memory as it is written — on any thread, in parallel —
and the shard's digest is

    sha256( sha256(header) ‖ sha256(tensor_1) ‖ … ‖ sha256(tensor_n) ‖ [sha256(trailing bytes)] )

with the tensors in file order (by start offset, then end, then name). `file_digest(path)` recomputes it
from any safetensors file (its own header says where the pieces are), reading the pieces in parallel.
Manifests written before this (`"sha256"`: the plain sha256 of the file) are still verified.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from engine.checkpoint.safetensors_format import parse_header
from engine.core.fsutil import HASH_CHUNK as _CHUNK
from engine.core.fsutil import sha256_file

KIND = "sha256-pieces"


def combine(piece_digests: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for d in piece_digests:
        h.update(d)
    return h.hexdigest()


def piece_order(offsets: dict[str, tuple[int, int]]) -> list[str]:
    """Tensor names in the order their digests are combined."""
    return sorted(offsets, key=lambda n: (offsets[n][0], offsets[n][1], n))


def hash_fd_range(fd: int, start: int, end: int, chunk_size: int = _CHUNK) -> bytes:
    """sha256 of bytes [start, end) of an open file (a short file hashes what it has: the digest will not match)."""
    h = hashlib.sha256()
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(chunk_size, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.digest()


def _hash_range(path: Path, start: int, end: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return hash_fd_range(fd, start, end)
    finally:
        os.close(fd)


def pieces_of(path: str | os.PathLike) -> list[tuple[int, int]]:
    """(start, end) of each piece of a safetensors file, in combination order. ValueError if not safetensors."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header, data_start = parse_header(fh, str(path))
    header.pop("__metadata__", None)
    offsets = {}
    for name, info in header.items():
        a, b = (int(x) for x in info["data_offsets"])
        offsets[name] = (data_start + a, data_start + b)
    pieces = [(0, data_start)] + [offsets[n] for n in piece_order(offsets)]
    last = max((b for _, b in pieces), default=0)
    if last < size:
        pieces.append((last, size))
    return pieces


def file_digest(path: str | os.PathLike, threads: int | None = None) -> str:
    """The pieces digest of a safetensors file, read back from disk ("" if it is not one)."""
    path = Path(path)
    try:
        pieces = pieces_of(path)
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    n = threads or min(8, os.cpu_count() or 1)
    if n <= 1 or len(pieces) <= 2:
        return combine(_hash_range(path, a, b) for a, b in pieces)
    with ThreadPoolExecutor(n, thread_name_prefix="digest") as ex:
        return combine(ex.map(lambda p: _hash_range(path, *p), pieces))


def matches(path: str | os.PathLike, rec: dict) -> bool:
    """Does the file at `path` match its manifest record (size and digest; a legacy plain sha256 too)?"""
    path = Path(path)
    try:
        if not path.exists() or ("size" in rec and path.stat().st_size != rec["size"]):
            return False
    except OSError:
        return False
    if rec.get("digest"):
        return rec.get("digest_kind", KIND) == KIND and file_digest(path) == rec["digest"]
    if rec.get("sha256"):
        return sha256_file(path) == rec["sha256"]
    return False
