"""S3 URLs, key ↔ path mapping, the transfer manifest and push order."""

from __future__ import annotations

import json

import pytest

from engine.core.errors import TransferError
from engine.s3.client import redact_patterns
from engine.s3.manifest import TransferManifest
from engine.s3.push import push_phase
from engine.s3.transfer import TransferOptions
from engine.s3.url import parse_url


def test_parse_url():
    u = parse_url("s3://my-bucket/models/dsv3/")
    assert (u.bucket, u.prefix, u.list_prefix, str(u)) == ("my-bucket", "models/dsv3", "models/dsv3/",
                                                           "s3://my-bucket/models/dsv3")
    assert u.key_for("a/b.json") == "models/dsv3/a/b.json" and u.rel_of("models/dsv3/a/b.json") == "a/b.json"
    assert parse_url("s3://bkt").list_prefix == ""


@pytest.mark.parametrize("bad", ["/local/dir", "s3://", "s3://x/p", "http://b/p", "s3://Bad Bucket/p"])
def test_bad_urls_are_refused_with_a_hint(bad):
    with pytest.raises(TransferError) as ei:
        parse_url(bad)
    assert ei.value.hint


def test_keys_escaping_the_directory_are_refused():
    u = parse_url("s3://bkt/p")
    for key in ("p/../etc/passwd", "p/./x", "p/"):
        with pytest.raises(TransferError, match="cannot be stored"):
            u.rel_of(key)


def test_manifest_round_trip_and_reset_on_other_transfer(tmp_path):
    path = tmp_path / "m.json"
    m = TransferManifest.load(path, direction="pull", url="s3://b/p", local="/x")
    m.record("a.safetensors", {"size": 3, "etag": "e", "sha256": "s", "mtime_ns": 1})
    again = TransferManifest.load(path, direction="pull", url="s3://b/p", local="/x")
    assert again.get("a.safetensors")["etag"] == "e" and not again.complete
    again.mark_complete("/x")
    assert json.loads(path.read_text())["complete"] is True
    assert TransferManifest.load(path, direction="pull", url="s3://b/other", local="/x").objects == {}
    assert TransferManifest.load(path, direction="push", url="s3://b/p", local="/x").objects == {}
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temp files


def test_push_order_shards_then_rest_then_index_and_configs():
    names = ["config.json", "model.safetensors.index.json", "tokenizer.json", "model-00001-of-00002.safetensors",
             "hf_quant_config.json", "generation_config.json", "tokenizer_config.json", "README.md",
             "sub/x.safetensors"]
    order = sorted(names, key=push_phase)
    assert order[:2] == ["model-00001-of-00002.safetensors", "sub/x.safetensors"]
    assert set(order[-5:]) == {"config.json", "model.safetensors.index.json", "hf_quant_config.json",
                               "generation_config.json", "tokenizer_config.json"}


def test_redaction_masks_key_ids_and_signed_query_secrets():
    text = "GET /b/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F2024&X-Amz-Signature=deadbeef key AKIAABCDEFGHIJKLMNOP"
    out = redact_patterns(text)
    assert "AKIAABCDEFGHIJKLMNOP" not in out and "deadbeef" not in out


def test_options_refuse_parts_below_the_s3_minimum():
    with pytest.raises(TransferError, match="5 MiB"):
        TransferOptions(part_size=1 << 20)
    with pytest.raises(TransferError):
        TransferOptions(concurrency=0)
