"""Parsing `s3://bucket/prefix` URLs and mapping keys to relative paths (and back), safely."""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.core.errors import TransferError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$", re.IGNORECASE)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # without leading or trailing '/'; '' means the whole bucket

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def list_prefix(self) -> str:
        """The prefix to list: 'a/b/' so that 'a/bc' is never taken for part of 'a/b'."""
        return f"{self.prefix}/" if self.prefix else ""

    def key_for(self, rel: str) -> str:
        return f"{self.list_prefix}{rel}"

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def rel_of(self, key: str) -> str:
        """The local relative path of `key` under this prefix; refuses keys that would escape the directory."""
        rel = key[len(self.list_prefix):]
        if not rel or any(p in ("", "..", ".") for p in rel.split("/")):
            raise TransferError(f"object key {key!r} cannot be stored under a local directory",
                                at=self.url_for(key),
                                hint="rename the object; keys with '..', '.' or empty path parts are refused")
        return rel


def parse_url(url: str) -> S3Url:
    """`s3://bucket[/prefix]` → S3Url; anything else raises TransferError naming the URL."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise TransferError(f"not an S3 URL: {url!r}", at=str(url), hint="write it as s3://bucket/prefix")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket or ""):
        raise TransferError(f"bad bucket name {bucket!r} in {url}", at=url,
                            hint="bucket names are 3-63 characters: lowercase letters, digits, '.', '-'")
    return S3Url(bucket=bucket, prefix=prefix.strip("/"))
