"""Locally computed S3 ETags and SHA-256, by hand-built values."""

from __future__ import annotations

import hashlib

import pytest

from engine.s3.checksum import candidate_part_sizes, clean_etag, digest_file, etag_parts, upload_part_size

MiB = 1 << 20


def test_single_put_etag_is_the_md5_and_sha256_of_the_file(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"hello world")
    d = digest_file(f)
    assert d.etag == hashlib.md5(b"hello world").hexdigest()
    assert d.sha256 == hashlib.sha256(b"hello world").hexdigest() and d.size == 11 and d.part_size == 0


@pytest.mark.parametrize("size,part,nparts", [(12 * MiB, 5 * MiB, 3), (10 * MiB, 5 * MiB, 2), (5 * MiB, 5 * MiB, 1),
                                              (5 * MiB + 1, 5 * MiB, 2)])
def test_multipart_etag_is_md5_of_part_md5s_dash_n(tmp_path, size, part, nparts):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    f = tmp_path / "b"
    f.write_bytes(data)
    parts = [hashlib.md5(data[i:i + part]).digest() for i in range(0, len(data), part)]
    assert len(parts) == nparts
    d = digest_file(f, part)
    assert d.etag == f"{hashlib.md5(b''.join(parts)).hexdigest()}-{nparts}"
    assert d.sha256 == hashlib.sha256(data).hexdigest()
    assert digest_file(f, part, etag=False).sha256 == d.sha256 and digest_file(f, part, etag=False).etag == ""
    assert etag_parts(f'"{d.etag}"') == nparts and etag_parts(hashlib.md5(data).hexdigest()) == 0


def test_empty_file(tmp_path):
    f = tmp_path / "e"
    f.write_bytes(b"")
    assert digest_file(f).etag == hashlib.md5(b"").hexdigest()


def test_upload_part_size_follows_boto3_rules():
    assert upload_part_size(4 * MiB, 8 * MiB) == 0  # below the threshold: a single PUT
    assert upload_part_size(8 * MiB, 8 * MiB) == 8 * MiB
    # S3 allows 10,000 parts: a 1 TB object at 8 MiB parts gets a larger part size
    assert upload_part_size(10 ** 12, 8 * MiB) * 10_000 >= 10 ** 12


def test_candidate_part_sizes_hint_first_and_consistent_with_part_count():
    assert candidate_part_sizes(100, "abc") == [0]
    c = candidate_part_sizes(20 * MiB, "x-3", hinted=(7 * MiB,))
    assert c[0] == 7 * MiB and all(-(-20 * MiB // p) == 3 for p in c)
    assert 8 * MiB in c and clean_etag('"x-3"') == "x-3"
