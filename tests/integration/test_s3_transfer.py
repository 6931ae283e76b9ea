"""S3 pull/push against a real S3 endpoint (moto's server): byte-identical round trip, order, resume,
verification and corruption, third-party objects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from engine.core.errors import TransferError
from engine.core.events import CallbackSink
from tests.integration.s3_server import fresh_bucket, make_checkpoint, same_tree

MiB = 1 << 20


@pytest.fixture
def s3(request, tmp_path, monkeypatch):
    """(server, bucket, boto3 client), the server's request counts cleared."""
    server, bucket, c = fresh_bucket(request, tmp_path, monkeypatch)
    server.clear()
    return server, bucket, c


def _events():
    evs = []
    return evs, CallbackSink(evs.append)


def test_push_then_pull_is_byte_identical_multipart_and_ordered(s3, tmp_path):
    from engine.s3 import pull, push

    server, bucket, c = s3
    src = make_checkpoint(tmp_path / "ckpt")
    evs, sink = _events()
    res = push(src, f"s3://{bucket}/models/ckpt", endpoint_url=server.url, part_size=5 * MiB, concurrency=4,
               sink=sink)
    assert (res.objects, res.transferred, res.skipped) == (7, 7, 0)
    big = c.head_object(Bucket=bucket, Key="models/ckpt/model-00001-of-00003.safetensors")
    assert big["ETag"].strip('"').endswith("-3")  # 12 MiB in 5 MiB parts: a real multipart upload
    assert big["Metadata"]["quantdeck-sha256"] == hashlib.sha256(
        (src / "model-00001-of-00003.safetensors").read_bytes()).hexdigest()

    # shards first, index and configs last: the last shard PUT precedes the first index/config PUT
    puts = [r.path.rsplit("/", 1)[-1] for r in server.puts()]
    last_shard = max(i for i, n in enumerate(puts) if n.endswith(".safetensors"))
    first_meta = min(i for i, n in enumerate(puts) if n.endswith("config.json") or n.endswith(".index.json"))
    assert last_shard < first_meta, puts
    prog = [e.data for e in evs if e.kind == "progress"]
    assert prog[-1]["done"] == prog[-1]["total"] == 7 and prog[-1]["bytes_done"] == res.bytes
    assert all(k in prog[-1] for k in ("rate", "eta_s", "bytes_total"))

    server.clear()
    c.put_object(Bucket=bucket, Key="models/ckpt/old-model-00009.safetensors", Body=b"older push")
    evs2, sink2 = _events()
    again = push(src, f"s3://{bucket}/models/ckpt", endpoint_url=server.url, part_size=5 * MiB, sink=sink2)
    assert (again.transferred, again.skipped) == (0, 7) and len(server.puts()) == 1
    assert any("1 object(s) under" in e.data["msg"] and "old-model-00009" in e.data["msg"]
               for e in evs2 if e.kind == "log")
    c.delete_object(Bucket=bucket, Key="models/ckpt/old-model-00009.safetensors")

    dst = tmp_path / "pulled" / "ckpt"
    got = pull(f"s3://{bucket}/models/ckpt", dst, endpoint_url=server.url, part_size=8 * MiB, concurrency=3)
    assert (got.objects, got.transferred, got.bytes) == (7, 7, res.bytes)
    assert same_tree(src, dst) == []
    assert not dst.with_name("ckpt.partial").exists()
    man = json.loads(Path(got.manifest).read_text())
    assert man["complete"] and {e["verified"] for e in man["objects"].values()} == {"sha256"}

    # pulling again is a no-op that says so; pulling over a different tree is refused
    assert pull(f"s3://{bucket}/models/ckpt", dst, endpoint_url=server.url).skipped == 7
    (dst / "config.json").write_text('{"edited": true}')
    with pytest.raises(TransferError, match="already exists and differs"):
        pull(f"s3://{bucket}/models/ckpt", dst, endpoint_url=server.url)


def test_corrupted_object_is_detected_on_pull_then_resume_fetches_only_it(s3, tmp_path):
    from engine.s3 import pull, push

    server, bucket, c = s3
    src = make_checkpoint(tmp_path / "ckpt", big_mib=6)
    push(src, f"s3://{bucket}/ck", endpoint_url=server.url, part_size=5 * MiB)
    key = "ck/model-00002-of-00003.safetensors"
    good = (src / "model-00002-of-00003.safetensors").read_bytes()
    head = c.head_object(Bucket=bucket, Key=key)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # one flipped byte, same size, same metadata: bit rot in the bucket
    c.put_object(Bucket=bucket, Key=key, Body=bytes(bad), Metadata=head["Metadata"])

    dst = tmp_path / "out"
    evs, sink = _events()
    with pytest.raises(TransferError) as ei:
        pull(f"s3://{bucket}/ck", dst, endpoint_url=server.url, retries=1, sink=sink)
    err = ei.value
    assert f"s3://{bucket}/{key}" in err.msg and "after 2 attempts" in err.msg and "sha256" in err.msg
    assert err.at == f"s3://{bucket}/{key}" and "corrupt" in err.hint
    assert any(e.kind == "log" and "retry 1/1" in e.data["msg"] and key in e.data["msg"] for e in evs)
    assert not dst.exists() and (tmp_path / "out.partial").is_dir()
    assert not (tmp_path / "out.partial" / "model-00002-of-00003.safetensors").exists()

    # repair the object; the resumed pull fetches it alone (every other object is in the manifest)
    c.put_object(Bucket=bucket, Key=key, Body=good, Metadata=head["Metadata"])
    (tmp_path / "out.partial" / "deleted-from-bucket.bin").write_bytes(b"stale")
    (tmp_path / "out.partial" / f".{Path(key).name}.qd-download.1a2b3c").write_bytes(b"torn")
    server.clear()
    res = pull(f"s3://{bucket}/ck", dst, endpoint_url=server.url)
    gets = [r.path for r in server.requests if r.method == "GET" and "list-type" not in r.query]
    assert gets == [f"/{bucket}/{key}"], gets
    assert (res.transferred, res.skipped) == (1, 6)
    assert same_tree(src, dst) == []


def test_object_uploaded_by_another_tool_is_verified_by_its_multipart_etag(s3, tmp_path):
    """An object without our SHA-256 (e.g. `aws s3 cp` with 8 MiB parts) is checked against its ETag,
    recomputed for the uploader's part size."""
    from boto3.s3.transfer import TransferConfig

    from engine.s3 import pull

    server, bucket, c = s3
    f = tmp_path / "blob.bin"
    f.write_bytes(bytes(range(256)) * (11 * MiB // 256))
    c.upload_file(str(f), bucket, "third/blob.bin",
                  Config=TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=6 * MiB))
    c.put_object(Bucket=bucket, Key="third/small.txt", Body=b"hello")
    res = pull(f"s3://{bucket}/third", tmp_path / "got", endpoint_url=server.url)
    assert res.transferred == 2
    man = json.loads(Path(res.manifest).read_text())
    assert {k: v["verified"] for k, v in man["objects"].items()} == {"blob.bin": "etag", "small.txt": "etag"}
    assert (tmp_path / "got" / "blob.bin").read_bytes() == f.read_bytes()
