"""Deciding whether a local file holds exactly an object's bytes (size, then SHA-256 or the ETag)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.s3.checksum import META_SHA256, candidate_part_sizes, clean_etag, digest_file, etag_parts


@dataclass(frozen=True)
class Expected:
    """What an object is: from HeadObject."""

    size: int
    etag: str
    sha256: str = ""  # from our metadata, when quantdeck pushed it
    kms: bool = False  # SSE-KMS/SSE-C: the ETag is not an MD5 of the bytes
    part_size_hint: int = 0  # the first part's size, read from the server for multipart objects

    @classmethod
    def from_head(cls, head: dict[str, Any], part_size_hint: int = 0) -> "Expected":
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
        kms = head.get("ServerSideEncryption") == "aws:kms" or bool(head.get("SSECustomerAlgorithm"))
        return cls(size=int(head["ContentLength"]), etag=clean_etag(head.get("ETag")),
                   sha256=str(meta.get(META_SHA256, "")).lower(), kms=kms, part_size_hint=part_size_hint)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    method: str  # sha256 | etag | size
    sha256: str
    why: str = ""


def verify_file(path: Path, exp: Expected, part_size: int) -> Verdict:
    """Compare a local file with an object: size first, then SHA-256 if the object carries one, else the ETag."""
    size = path.stat().st_size
    if size != exp.size:
        return Verdict(False, "size", "", f"size {size} != {exp.size} bytes")
    hinted = tuple(p for p in (exp.part_size_hint, part_size) if p)
    candidates = [] if exp.kms else candidate_part_sizes(exp.size, exp.etag, hinted)
    first = candidates[0] if candidates else 0
    if exp.sha256:  # ours: the SHA-256 alone decides, whatever part size was used
        d = digest_file(path, 0, etag=False)
        if d.sha256 == exp.sha256:
            return Verdict(True, "sha256", d.sha256)
        return Verdict(False, "sha256", d.sha256, f"sha256 {d.sha256[:16]}… != {exp.sha256[:16]}… in metadata")
    d = digest_file(path, first)
    if not candidates:
        return Verdict(True, "size", d.sha256, "no checksum to compare (encrypted ETag or unknown part size)")
    if d.etag == exp.etag:
        return Verdict(True, "etag", d.sha256)
    if exp.part_size_hint == 0 and etag_parts(exp.etag) > 0:
        for ps in candidates[1:]:
            if digest_file(path, ps).etag == exp.etag:
                return Verdict(True, "etag", d.sha256)
    return Verdict(False, "etag", d.sha256, f"ETag {d.etag} != {exp.etag}")
