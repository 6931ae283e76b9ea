"""Checksums that prove an object and a local file hold the same bytes.

Two are used (see engine/s3/__init__.py for the policy):
- SHA-256 of the whole file, which push stores in the object's metadata under `quantdeck-sha256`;
- the S3 ETag, computed locally: MD5 of the file for a single PUT, or for a multipart upload of N parts
  `md5(md5(part1) + … + md5(partN))` followed by `-N`. It depends on the part size the uploader used.

`digest_file` reads a file once and gives both (for one part size).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from s3transfer.utils import ChunksizeAdjuster

READ_CHUNK = 8 << 20
META_SHA256 = "quantdeck-sha256"  # object metadata key (sent as x-amz-meta-quantdeck-sha256)
# part sizes that common uploaders use (aws cli/boto3 8 MiB, s5cmd 50 MiB, ...), tried when an
# object has no SHA-256 in its metadata and its part size cannot be read from the server
COMMON_PART_SIZES = tuple(m << 20 for m in (8, 5, 16, 15, 32, 50, 64, 100, 128, 256, 512))


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str
    etag: str  # without quotes
    part_size: int  # the part size `etag` was computed for (0: single PUT)


def upload_part_size(size: int, part_size: int) -> int:
    """The part size boto3 really uses for a file of `size` bytes (0 when it does a single PUT)."""
    if size < part_size:
        return 0
    return ChunksizeAdjuster().adjust_chunksize(part_size, size)


def digest_file(path: str | os.PathLike, part_size: int = 0, etag: bool = True) -> FileDigest:
    """SHA-256 and ETag of a file in one read; `part_size` 0 means a single-PUT (plain MD5) ETag.
    `etag=False` skips the MD5 work (etag comes back '') when only the SHA-256 is needed."""
    sha = hashlib.sha256()
    whole_md5 = hashlib.md5()
    part_md5s: list[bytes] = []
    part = hashlib.md5()
    in_part = 0
    size = 0
    with open(path, "rb") as fh:
        while True:
            want = READ_CHUNK if not part_size else min(READ_CHUNK, part_size - in_part)
            chunk = fh.read(want)
            if not chunk:
                break
            size += len(chunk)
            sha.update(chunk)
            if not etag:
                continue
            if part_size:
                part.update(chunk)
                in_part += len(chunk)
                if in_part == part_size:
                    part_md5s.append(part.digest())
                    part, in_part = hashlib.md5(), 0
            else:
                whole_md5.update(chunk)
    if not etag:
        return FileDigest(size=size, sha256=sha.hexdigest(), etag="", part_size=part_size)
    if part_size:
        if in_part or not part_md5s:
            part_md5s.append(part.digest())
        tag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
    else:
        tag = whole_md5.hexdigest()
    return FileDigest(size=size, sha256=sha.hexdigest(), etag=tag, part_size=part_size)


def clean_etag(etag: str | None) -> str:
    return (etag or "").strip().strip('"')


def etag_parts(etag: str) -> int:
    """Number of parts an ETag says the object was uploaded in (0 for a single PUT)."""
    _, dash, n = clean_etag(etag).partition("-")
    return int(n) if dash and n.isdigit() else 0


def candidate_part_sizes(size: int, etag: str, hinted: tuple[int, ...] = ()) -> list[int]:
    """Part sizes that could have produced `etag` for an object of `size` bytes, most likely first."""
    n = etag_parts(etag)
    if n == 0:
        return [0]
    out: list[int] = []
    for ps in (*hinted, *COMMON_PART_SIZES):
        if ps and ps not in out and -(-size // ps) == n:
            out.append(ps)
    return out
